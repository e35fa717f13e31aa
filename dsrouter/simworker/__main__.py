from dsrouter.simworker.server import main

raise SystemExit(main())
