from clakit.cli import main

raise SystemExit(main())
