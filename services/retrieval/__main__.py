import sys

if len(sys.argv) > 1 and sys.argv[1] == "ingest":
    from services.retrieval.cli import main as ingest

    ingest(sys.argv[2:])
else:
    from services.retrieval.server import main

    main()
