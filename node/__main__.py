import sys

try:
    from node.cli import main
except KeyboardInterrupt:  # Ctrl-C in the few ms before main() handles it
    sys.exit(130)

sys.exit(main())
