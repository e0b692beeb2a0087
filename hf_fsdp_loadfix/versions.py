"""Which transformers releases get which patch set, and why.  This table is the tested range; a release newer
than it gets the newest patch set when its structure matches (``classes.PatchSet.mismatch``) and the package's meta
path works on it (``_gate.Proof``)."""

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# (releases,            class, what upstream leaves on a non-local-rank-0 process)
TABLE = [
    (">=4.53.0,<4.57.0", "c1", "empty_like params on CPU; buffers fine"),
    (">=4.57.0,<5.0.0", "c2", "as C1, new signatures"),
    (">=5.0.0,<5.4.0", "c3", "reads all shards; empty_like + full random init of the whole model"),
    (">=5.4.0,<5.6.0", "c4", "reads all shards; empty_like; root-owned non-persistent buffers garbage"),
    (">=5.6.0,<5.23.0", "c5", "reads all shards; zeros_like: full model committed per rank; root buffers zero"),
    (">=5.23.0,<5.25.0", "c6", "reads all shards and keeps them; root-owned non-persistent buffers zero"),
    (">=5.25.0,<5.26.0", "c7", "as C6, then kernelizes the model for its device by default (meta: kernels raises)"),
]
NEWEST_TESTED = "5.25.x"
SUPPORTED = f"4.53.0 - {NEWEST_TESTED}"
NEWEST = TABLE[-1][1]
FIRST_UNTESTED = next(s.version for s in SpecifierSet(TABLE[-1][0]) if s.operator == "<")


def class_for(version: str) -> str | None:
    v = Version(version)
    for spec, name, _ in TABLE:
        if SpecifierSet(spec).contains(v, prereleases=True):
            return name
    return None


def newer_than_table(version: str) -> bool:
    """After the table's last range (the ranges have no gaps): untested, patched if the structure matches."""
    last_start = min(Version(spec.version) for spec in SpecifierSet(TABLE[-1][0]))
    return class_for(version) is None and Version(version) > last_start
