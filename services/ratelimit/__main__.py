from services.ratelimit.server import main

main()
