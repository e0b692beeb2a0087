"""Test matrix: one environment per upstream behaviour class (see hf_fsdp_loadfix/versions.py).

Every environment reuses the interpreter's CPU torch (``--system-site-packages``) instead of downloading one:
install ``torch==2.13.0`` (CPU) into the interpreter that runs nox first.
"""

import nox

# release -> extra pins that release needs (4.x predates huggingface-hub 1.0)
DEFAULT = {
    "4.56.2": ["huggingface-hub<1.0"],
    "4.57.6": ["huggingface-hub<1.0"],
    "5.3.0": [],
    "5.5.4": [],
    "5.22.2": [],
    "5.23.0": [],
}
# opt-in (`nox -s boundaries`): the first release of each class (4.57.0 is yanked, so 4.57.1)
BOUNDARIES = {"4.53.0": ["huggingface-hub<1.0"], "4.57.1": ["huggingface-hub<1.0"], "5.0.0": [], "5.4.0": [],
              "5.6.0": []}

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True


def _run(session, release, pins):
    session.install(".", "pytest", "accelerate", f"transformers=={release}", *pins)
    session.run("python", "-c", "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__")
    session.run("python", "-m", "pytest", "-q", *session.posargs)  # the venv's interpreter, not a system pytest


@nox.session(venv_params=["--system-site-packages"])
@nox.parametrize("release", list(DEFAULT))
def tests(session, release):
    _run(session, release, DEFAULT[release])


@nox.session(venv_params=["--system-site-packages"])
@nox.parametrize("release", list(BOUNDARIES))
def boundaries(session, release):
    _run(session, release, BOUNDARIES[release])
