"""Coverage-guided fuzzing (atheris) of fuzz/targets.py.

make fuzz          # FUZZ_SECONDS=60 by default; new inputs are added to fuzz/corpus/
"""

import sys

import atheris

with atheris.instrument_imports():
    from fuzz import targets


def main() -> None:
    atheris.Setup(sys.argv, targets.receive)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
