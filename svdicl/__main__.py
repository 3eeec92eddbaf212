from svdicl.cli import main

raise SystemExit(main())
