from lowres_birds.cli import main

raise SystemExit(main())
