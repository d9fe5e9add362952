"""Everything else is in pyproject.toml. This file only installs ``diffsampler-torchrun.pth``.

The startup hook makes ``torchrun --nproc-per-node P -- diffsampler generate ...`` work (see
``src/diffsampler/_torchrun.py`` for why). A ``.pth`` file must sit at the top of site-packages, which
pyproject.toml cannot ask setuptools for, so ``build_py`` writes it: into ``build_lib`` for a wheel, and,
for ``pip install -e`` (PEP 660), into the directory the editable wheel is packed from (``install_lib``,
which setuptools' ``editable_wheel`` points at that directory; what ``build_py`` leaves in ``build_lib``
is not packed there). Its text lives here, so an sdist needs no extra file.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "diffsampler-torchrun.pth"
# One line, run by `site` at every interpreter start: nothing but a list and a dict lookup unless this is
# a torchrun worker started as `python -u diffsampler ...`; then it runs diffsampler/_torchrun.py by path
# (not importing the package or torch) and calls its reexec().
PTH = (
    'import os, sys; sys.orig_argv[1:3] == ["-u", "diffsampler"] and "TORCHELASTIC_RUN_ID" in os.environ'
    ' and __import__("runpy").run_path(os.path.join(__import__("importlib.util").util.find_spec("diffsampler")'
    '.submodule_search_locations[0], "_torchrun.py"))["reexec"]()\n'
)


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        path = os.path.join(target, PTH_NAME)
        self.mkpath(target)
        self.announce(f"writing {path}", level=2)
        if not self.dry_run:
            with open(path, "w", encoding="utf-8") as f:
                f.write(PTH)


setup(cmdclass={"build_py": build_py_with_pth})
