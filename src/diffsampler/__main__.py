"""``python -m diffsampler ...`` (and ``torchrun --nproc-per-node P -m diffsampler generate ...``): the command line."""

from .cli import main

if __name__ == "__main__":
    main()
