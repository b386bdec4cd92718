from histopipe.cli import main

raise SystemExit(main())
