from hemaedge.cli import main

raise SystemExit(main())
