from servekit.cli import main

raise SystemExit(main())
