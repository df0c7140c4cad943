from edge.sink.cli import main

raise SystemExit(main())
