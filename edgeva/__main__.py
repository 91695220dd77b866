from edgeva.cli import main

raise SystemExit(main())
