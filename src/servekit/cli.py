"""`servekit` command line: a thin layer over the library packages."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_probe(args: argparse.Namespace) -> int:
    from servekit.probe import probe_targets, run_probes
    from servekit.probe.report import render_table, write_reports

    if args.inventory:
        from servekit.inventory import probe_targets as inventory_targets

        runs = []
        for t in inventory_targets(Path(args.inventory), args.group):
            runs.extend(
                probe_targets(
                    [(t.host, args.url or t.url)],
                    model=args.model or t.model,
                    api_key=args.api_key or t.api_key,
                    max_model_len=args.max_model_len or t.max_model_len,
                    timeout=args.timeout,
                    reasoning_parser=args.reasoning_parser or t.reasoning_parser,
                )
            )
    else:
        if not args.url or not args.model:
            print("servekit probe: give --url and --model, or --inventory", file=sys.stderr)
            return 2
        runs = [
            run_probes(
                base_url=args.url,
                model=args.model,
                api_key=args.api_key,
                max_model_len=args.max_model_len,
                timeout=args.timeout,
                target=args.url,
                reasoning_parser=args.reasoning_parser,
            )
        ]
    print(render_table(runs))
    paths = write_reports(runs, Path(args.report_dir))
    print("reports: " + ", ".join(str(p) for p in paths.values()))
    return 0 if runs and all(r.ok for r in runs) else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    from servekit.verify import run_verify

    result = run_verify(
        Path(args.inventory),
        Path(args.report_dir),
        args.group,
        jobs=args.jobs,
        gateway_group=args.gateway_group or None,
        deep=args.deep,
    )
    return 0 if result.ok else 1


def _cmd_k8s_values(args: argparse.Namespace) -> int:
    from servekit.inventory import InventoryError
    from servekit.k8s import K8sValuesError, render, values_from_inventory

    resources = {
        k: v
        for k, v in {
            "request_cpu": args.request_cpu,
            "request_memory": args.request_memory,
            "pvc_storage": args.pvc_storage,
        }.items()
        if v is not None
    }
    try:
        data = values_from_inventory(
            Path(args.inventory),
            args.group,
            image=args.image,
            resources=resources,
            secret_name=args.secret_name,
            storage_class=args.storage_class,
            download_allowance=args.download_allowance,
        )
    except (K8sValuesError, InventoryError) as exc:
        print(f"servekit k8s-values: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render(data, args.inventory, args.group))
    return 0


def _cmd_mirror_serve(args: argparse.Namespace) -> int:
    from servekit.mirror.server import serve

    serve(Path(args.root), host=args.host, port=args.port)
    return 0


def _cmd_mirror_fetch(args: argparse.Namespace) -> int:
    from servekit.mirror.fetch import fetch

    path = fetch(args.model_id, Path(args.dest), revision=args.revision, endpoint=args.endpoint)
    print(path)
    return 0


def _cmd_testmodel(args: argparse.Namespace) -> int:
    from servekit.testmodel import generate

    print(generate(Path(args.dest), seed=args.seed))
    return 0


def _cmd_sandbox(args: argparse.Namespace) -> int:
    from servekit.sandbox import manager

    if args.action == "up":
        manager.up(hosts=args.hosts, gateway=args.gateway)
    elif args.action == "engine-facts":
        from servekit.sandbox.vllm_facts import record

        record()
    elif args.action == "down":
        manager.down(purge=args.purge)
    else:
        import json

        print(json.dumps(manager.status(), indent=2))
    return 0


def _cmd_images(args: argparse.Namespace) -> int:
    from servekit.checkout import repo_root
    from servekit.images import lock
    from servekit.images.registry import resolve_digest
    from servekit.images.tags import TagError, aliased, inventory_image_tags
    from servekit.inventory import InventoryError

    aliases = dict(a.split("=", 1) for a in args.registry_alias)
    resolve = aliased(resolve_digest, aliases)
    inventory = Path(args.inventory)
    path = lock.lock_path(inventory)
    try:
        tags = inventory_image_tags(inventory, repo_root(), args.group)
        if args.action == "lock":
            statuses = lock.lock(tags, path, resolve=resolve)
        else:
            statuses = lock.check(tags, lock.read_lock(path), resolve=resolve)
    except (InventoryError, TagError, lock.LockError) as exc:
        print(f"servekit images {args.action}: {exc}", file=sys.stderr)
        # Before a deploy the check only informs: preflight decides, and names the fix.
        return 2 if args.action == "lock" else 0
    print(f"{path} ({'written' if args.action == 'lock' else 'read'}):")
    print(lock.render_status_table(statuses, str(inventory)))
    if args.action == "lock":
        failed = [s for s in statuses if s.error]
        return 1 if failed else 0
    # A moved tag or an unreachable registry is said, not fatal: deploys take the locked
    # digest. A tag without an entry stops in preflight, which names the fix.
    return 0


def _cmd_docker(args: argparse.Namespace) -> int:
    from servekit.sandbox.engine import ensure_docker_engine

    ensure_docker_engine()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="servekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("probe", help="probe a vLLM OpenAI-compatible endpoint")
    p.add_argument("--url", help="base URL, e.g. http://10.0.0.5:8000")
    p.add_argument("--model", help="served model name, e.g. Qwen3-8B")
    p.add_argument("--api-key", help="API key (or rely on the inventory's vllm_service_api_key)")
    p.add_argument("--max-model-len", type=int, help="expected max_model_len")
    p.add_argument("--reasoning-parser", help="reasoning parser the server runs with")
    p.add_argument("--inventory", help="probe every host of an Ansible inventory instead")
    p.add_argument("--group", default="gpu_hosts", help="inventory group to probe")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--report-dir", default="reports", help="where JSON and JUnit reports go")
    p.set_defaults(func=_cmd_probe)

    v = sub.add_parser(
        "verify",
        help="host checks and request probes over an inventory",
        description="Host checks (pytest-testinfra, one process per host, in parallel), then "
        "request probes of every host's endpoint (in parallel). Writes hosts.junit.xml, "
        "probes.json, probes.junit.xml and verify.json to the report directory; exits "
        "non-zero if anything failed.",
        epilog="The probes take the API key from the inventory's vllm_service_api_key; when "
        "that is a template or an Ansible Vault value (it is not decrypted here), set the "
        "environment variable SERVEKIT_API_KEY to the key.",
    )
    v.add_argument("--inventory", required=True)
    v.add_argument("--group", default="gpu_hosts")
    v.add_argument(
        "--gateway-group",
        default="gateway",
        help="inventory group of the gateway hosts, checked and probed too ('' for none)",
    )
    v.add_argument("--report-dir", default="reports")
    v.add_argument("--jobs", type=int, default=16, help="hosts checked at once (default 16)")
    v.add_argument(
        "--deep",
        action="store_true",
        help="also hash every model file against the SHA-256 in its manifest (reads the whole "
        "model on each host; without it the sizes are compared)",
    )
    v.set_defaults(func=_cmd_verify)

    k = sub.add_parser(
        "k8s-values",
        help="Helm values for the vLLM production-stack chart, from the inventory",
        description="Prints values.yaml for the vllm-stack chart "
        "(https://github.com/vllm-project/production-stack): one modelSpec per distinct "
        "serving configuration of the group's hosts, replicaCount = hosts sharing it, one "
        "shared model volume, no spare pods on updates. The API key becomes a reference to a "
        "Kubernetes Secret, never the key.",
    )
    k.add_argument("--inventory", required=True)
    k.add_argument("--group", default="gpu_hosts")
    k.add_argument("--image", help="image instead of the inventory's (name:tag@sha256:...)")
    k.add_argument("--request-cpu", type=int, help="CPUs per replica (default 8)")
    k.add_argument("--request-memory", help="memory per replica (default 32Gi)")
    k.add_argument("--pvc-storage", help="size of the shared model volume (default 50Gi)")
    k.add_argument("--secret-name", default="servekit-vllm-api-key", help="Secret with the key")
    k.add_argument(
        "--storage-class",
        help="storage class of the model volume the replicas share; it must provide "
        "ReadWriteMany volumes when there is more than one (default: the inventory's "
        "servekit_k8s_storage_class)",
    )
    k.add_argument(
        "--download-allowance",
        type=int,
        help="seconds a pod may take to download the model before its start budget "
        "(vllm_service_start_timeout) begins (default: the inventory's "
        "servekit_k8s_download_allowance, else 1800)",
    )
    k.set_defaults(func=_cmd_k8s_values)

    m = sub.add_parser("mirror", help="ModelScope-compatible model mirror")
    msub = m.add_subparsers(dest="mirror_command", required=True)
    ms = msub.add_parser("serve", help="serve ROOT/<owner>/<name>/ over the ModelScope API")
    ms.add_argument("root")
    ms.add_argument("--host", default="127.0.0.1", help="bind address")
    ms.add_argument("--port", type=int, default=8090)
    ms.set_defaults(func=_cmd_mirror_serve)
    mf = msub.add_parser("fetch", help="fill the mirror from upstream with the modelscope SDK")
    mf.add_argument("model_id")
    mf.add_argument("--dest", required=True, help="mirror root")
    mf.add_argument("--revision")
    mf.add_argument("--endpoint", help="upstream endpoint (default: the SDK's)")
    mf.set_defaults(func=_cmd_mirror_fetch)

    t = sub.add_parser("testmodel", help="write a tiny random-weight Qwen3 model")
    t.add_argument("dest")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_cmd_testmodel)

    s = sub.add_parser("sandbox", help="local sandbox GPU hosts (containers with systemd)")
    s.add_argument("action", choices=["up", "down", "status", "engine-facts"])
    s.add_argument("--hosts", type=int, default=1)
    s.add_argument(
        "--gateway",
        action="store_true",
        help="up: fleet mode, a gateway host on 127.0.0.1:8000 in front of the hosts",
    )
    s.add_argument("--purge", action="store_true", help="down: also drop the registry cache")
    s.set_defaults(func=_cmd_sandbox)

    i = sub.add_parser(
        "images",
        help="lock image tags to digests, or check the lock against the registries",
        description="lock: resolve every image tag the inventory's hosts run (vllm_service) "
        "at its registry (Registry HTTP API v2) and write images.lock.yml beside the "
        "inventory, for the site to commit. check: compare the lock with what the tags "
        "point to now; deploys always take the locked digest.",
    )
    i.add_argument("action", choices=["lock", "check"])
    i.add_argument("--inventory", required=True)
    i.add_argument("--group", default="gpu_hosts")
    i.add_argument(
        "--registry-alias",
        action="append",
        default=[],
        metavar="NAME=ADDRESS",
        help="reach registry NAME (as the hosts call it) at ADDRESS from here",
    )
    i.set_defaults(func=_cmd_images)

    d = sub.add_parser("docker-engine", help="make sure a Docker engine runs on this machine")
    d.set_defaults(func=_cmd_docker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
