"""``python -m hesscli`` (and ``torchrun -m hesscli``)."""

from hesscli.cli import main

if __name__ == "__main__":
    main()
