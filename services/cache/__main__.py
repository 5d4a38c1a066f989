from services.cache.server import main

main()
