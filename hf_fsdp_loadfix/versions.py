"""Which transformers releases get which patch set, and why.  This table is the supported range."""

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# (releases,            class, what upstream leaves on a non-local-rank-0 process)
TABLE = [
    (">=4.53.0,<4.57.0", "c1", "empty_like params on CPU; buffers fine"),
    (">=4.57.0,<5.0.0", "c2", "as C1, new signatures"),
    (">=5.0.0,<5.4.0", "c3", "reads all shards; empty_like + full random init of the whole model"),
    (">=5.4.0,<5.6.0", "c4", "reads all shards; empty_like; root-owned non-persistent buffers garbage"),
    (">=5.6.0,<5.23.0", "c5", "reads all shards; zeros_like: full model committed per rank; root buffers zero"),
    (">=5.23.0,<5.24.0", "c6", "reads all shards and keeps them; root-owned non-persistent buffers zero"),
]
SUPPORTED = "4.53.0 - 5.23.x"
NEWEST = TABLE[-1][1]


def class_for(version: str) -> str | None:
    v = Version(version)
    for spec, name, _ in TABLE:
        if SpecifierSet(spec).contains(v, prereleases=True):
            return name
    return None
