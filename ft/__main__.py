from ft.cli import main

raise SystemExit(main())
