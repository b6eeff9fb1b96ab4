from llmrl.cli import main

raise SystemExit(main())
