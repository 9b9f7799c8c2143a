"""The FAISS index: profiles by catalogue size (exact Flat, accurate IVF+SQ8, compact PCA256+IVF+SQ8), search
parameters as data applied at open (nprobe, efSearch, quantizer_efSearch, k_factor, filter_factor), FAISS's own
file format. docs/large-catalogues.md explains each profile and parameter."""
import math
from dataclasses import dataclass

import faiss
import numpy as np

from .. import EMBEDDING_DIM

SEARCH_PARAM_NAMES = ("nprobe", "efSearch", "quantizer_efSearch", "k_factor", "filter_factor")
EXACT_UP_TO = 50_000  # items; above this the "accurate" profile is recommended
ACCURATE_UP_TO = 10_000_000  # items; above this the "compact" profile is recommended
HNSW_QUANTIZER_FROM = 65_536  # lists; at and above this the coarse quantizer is an HNSW graph


# ---------------------------------------------------------------------------------------------- profiles

def ivf_lists(count):
    """nlist for a catalogue of `count` items: a power of two near 2 * sqrt(count) up to 10M items (coarse search
    and list scans then cost about the same at nprobe 8-16), near 8 * sqrt(count) above (HNSW coarse quantizer),
    with at least 39 items per list, as k-means training needs."""
    target = (2 if count <= ACCURATE_UP_TO else 8) * math.sqrt(max(count, 1))
    nlist = 2 ** round(math.log2(max(target, 1)))
    return int(min(max(nlist, 1), max(count // 39, 1), 262_144))


def ivf_probes(nlist, at_512):
    """nprobe for `nlist` lists: `at_512` up to 512 lists, then growing with the square root of nlist (a power
    of two).
    Measured at 512 and 2048 lists (docs/large-catalogues.md); beyond, a starting point to check with the
    benchmark's nprobe sweep."""
    nprobe = at_512 * math.sqrt(max(nlist, 512) / 512)
    return int(min(nlist, 2 ** round(math.log2(nprobe))))


def ivf_factory(nlist, codes):
    quantizer = "_HNSW32" if nlist >= HNSW_QUANTIZER_FROM else ""
    return f"IVF{nlist}{quantizer},{codes}"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    prefix: str  # before the IVF part ("" or a transform such as "PCA256,"); None: exact Flat
    codes: str  # the IVF list encoding
    min_nprobe: int  # nprobe at 512 lists; see ivf_probes
    k_factor: int
    filter_factor: int

    def factory(self, count):
        return "Flat" if self.prefix is None else self.prefix + ivf_factory(ivf_lists(count), self.codes)

    def search_params(self, count):
        if self.prefix is None:
            return {}
        nlist = ivf_lists(count)
        params = {"nprobe": ivf_probes(nlist, self.min_nprobe), "k_factor": self.k_factor,
                  "filter_factor": self.filter_factor}
        if nlist >= HNSW_QUANTIZER_FROM:
            params["quantizer_efSearch"] = max(64, 2 * params["nprobe"])
        return params


PROFILES = {
    "exact": Profile("exact", "Flat: exact search, 8 KiB per item in RAM", None, "", 1, 1, 1),
    "accurate": Profile("accurate", "IVF + 8-bit scalar codes (2 KiB per item), re-ranked exactly", "", "SQ8",
                        8, 2, 2),
    "compact": Profile("compact", "PCA to 256-d + IVF + 8-bit codes (264 B per item in RAM), re-ranked exactly "
                                  "against the stored vectors on disk", "PCA256,", "SQ8", 16, 10, 2),
}


def recommended_profile(count):
    if count <= EXACT_UP_TO:
        return "exact"
    return "accurate" if count <= ACCURATE_UP_TO else "compact"


@dataclass(frozen=True)
class IndexPlan:
    """What to build for a catalogue: the profile name ("custom" for a --factory string), factory, search params."""
    profile: str
    factory: str
    search: dict

    def to_dict(self):
        return {"profile": self.profile, "factory": self.factory, "search": dict(self.search)}


def check_search_params(params):
    params = dict(params or {})
    unknown = set(params) - set(SEARCH_PARAM_NAMES)
    if unknown:
        raise ValueError(f"unknown search parameters {sorted(unknown)}; known: {', '.join(SEARCH_PARAM_NAMES)}")
    for name, value in params.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"search parameter {name} must be a positive integer, not {value!r}")
    return params


def plan_index(count, profile=None, factory=None, search=None):
    """The IndexPlan for `count` items: a named profile (default: chosen by size) or any index_factory string.

    A factory string gets the default search parameters of its kind (nprobe for IVF, efSearch for HNSW), so that
    an IVF index never quietly searches a single list; `search` overrides any of them.
    """
    if profile is not None and factory is not None:
        raise ValueError("give a profile or a factory string, not both")
    if factory is None:
        name = profile or recommended_profile(count)
        if name not in PROFILES:
            raise ValueError(f"unknown index profile {name!r}; known: {', '.join(PROFILES)}")
        chosen = PROFILES[name]
        return IndexPlan(name, chosen.factory(count), {**chosen.search_params(count), **check_search_params(search)})
    index = new_index(factory)  # fails early on a string FAISS does not know
    defaults = {}
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        defaults = {"nprobe": min(ivf.nlist, max(8, ivf.nlist // 64))}
        if is_exact_codes(index) is False:
            defaults["k_factor"] = 2
    elif "HNSW" in factory:
        defaults = {"efSearch": 64, "k_factor": 2}
    elif not is_exact_codes(index):  # flat codes (SQ, PQ): a shortlist re-ranked exactly
        defaults = {"k_factor": 2}
    return IndexPlan("custom", factory, {**defaults, **check_search_params(search)})


# ---------------------------------------------------------------------------------------------- building

def new_index(factory):
    """An empty index for `factory`, able to take int64 ids (add_with_ids): IVF indexes natively, others wrapped
    in IndexIDMap."""
    try:
        index = faiss.index_factory(EMBEDDING_DIM, factory, faiss.METRIC_L2)
    except RuntimeError as error:
        raise ValueError(f"FAISS cannot build index_factory string {factory!r}: {error}") from None
    if faiss.try_extract_index_ivf(index) is None and not isinstance(index, faiss.IndexIDMap):
        index = faiss.IndexIDMap(index)
    return index


def is_exact_codes(index):
    """True when the index stores float32 vectors (Flat, IVF..,Flat): its distances need no re-ranking."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    ivf = faiss.try_extract_index_ivf(inner)
    if isinstance(inner, faiss.IndexPreTransform):
        return False
    if ivf is not None:
        return isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFlat)
    return isinstance(inner, faiss.IndexFlat)


def takes_search_params(index):
    """False for an index whose search refuses SearchParameters (IndexPQ in FAISS 1.15), so takes no selector."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return not isinstance(inner, faiss.IndexPQ)


def flat_codes(index):
    """The IndexFlatCodes (Flat, SQ, PQ without IVF) inside an index, through IndexIDMap; else None."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return inner if isinstance(inner, faiss.IndexFlatCodes) else None


def reserve(index, total):
    """Allocates room for `total` vectors at once in a flat-codes index, so that adding them never reallocates
    (a growing vector copies itself: 16 GiB for a moment when an 8 GiB Flat index grows by one row)."""
    flat = flat_codes(index)
    if flat is not None and total * flat.code_size > flat.codes.size():
        size = flat.codes.size()
        flat.codes.resize(int(total) * flat.code_size)
        flat.codes.resize(size)  # the capacity stays


def train_rows(index, count):
    """How many sample rows training needs: 40 per IVF list (FAISS warns under 39), at least 20,000 for the
    codebooks, never more than the catalogue."""
    if index.is_trained:
        return 0
    ivf = faiss.try_extract_index_ivf(index)
    want = max(40 * (ivf.nlist if ivf is not None else 256), 20_000)
    return int(min(count, want))


def save_index(index, path):
    faiss.write_index(index, str(path))


# ---------------------------------------------------------------------------------------------- opening

MMAP_FLAGS = {  # what each flag maps in faiss 1.15.1 (docs/large-catalogues.md)
    "IO_FLAG_MMAP": faiss.IO_FLAG_MMAP,  # IVF inverted lists (array lists), read-only and shared; not Flat codes
    "IO_FLAG_MMAP_IFC": faiss.IO_FLAG_MMAP_IFC,  # IndexFlatCodes storage (Flat and its id map) and IVF lists
}


def mmap_flag_for(index):
    """The flag that maps the bulk of `index` from its file: IO_FLAG_MMAP for IVF (zero-copy lists), else IFC."""
    return "IO_FLAG_MMAP" if faiss.try_extract_index_ivf(index) is not None else "IO_FLAG_MMAP_IFC"


def open_index(path, mmap_flag=None):
    """Reads an index; with `mmap_flag` (a MMAP_FLAGS name) read-only and memory-mapped from the file."""
    flags = 0
    if mmap_flag is not None:
        if mmap_flag not in MMAP_FLAGS:
            raise ValueError(f"unknown mmap flag {mmap_flag!r}; known: {', '.join(MMAP_FLAGS)}")
        flags = MMAP_FLAGS[mmap_flag] | faiss.IO_FLAG_READ_ONLY
    index = faiss.read_index(str(path), flags)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        lists = faiss.downcast_InvertedLists(ivf.invlists)
        if isinstance(lists, faiss.OnDiskInvertedLists):
            # IO_FLAG_MMAP serves the lists as OnDiskInvertedLists, which by default starts 32 prefetch threads
            # on every search, which slows small searches down; the pages are in the page cache anyway.
            lists.prefetch_nthread = 0
    return index


# ---------------------------------------------------------------------------------------------- searching

def ivf_of(index):
    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else faiss.downcast_index(ivf)


def search_parameters(index, selector=None, nprobe=None, efSearch=None, quantizer_efSearch=None):
    """FAISS SearchParameters for one search of `index`, through its wrappers (IDMap, PreTransform), carrying the
    id selector and the per-query nprobe / efSearch. Returns (params, keep): hold `keep` until the search ends."""
    keep = [selector]
    if isinstance(index, faiss.IndexIDMap):  # passes the parameters to the index it wraps, translating the ids
        return search_parameters(faiss.downcast_index(index.index), selector, nprobe, efSearch, quantizer_efSearch)
    if isinstance(index, faiss.IndexPreTransform):
        inner, inner_keep = search_parameters(faiss.downcast_index(index.index), selector, nprobe, efSearch,
                                              quantizer_efSearch)
        params = faiss.SearchParametersPreTransform()
        params.index_params = inner
        return params, keep + [inner] + inner_keep
    if isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        if nprobe is not None:
            params.nprobe = int(min(nprobe, index.nlist))
        else:
            params.nprobe = index.nprobe
        if quantizer_efSearch is not None:
            quantizer_params = faiss.SearchParametersHNSW()
            quantizer_params.efSearch = int(quantizer_efSearch)
            params.quantizer_params = quantizer_params
            keep.append(quantizer_params)
    elif isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        if efSearch is not None:
            params.efSearch = int(efSearch)
    else:
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector
    return params, keep


def apply_search_params(index, params):
    """Sets the stored search parameters on the index itself (nprobe, efSearch), for searches without a
    per-query SearchParameters object."""
    space = faiss.ParameterSpace()
    for name in ("nprobe", "efSearch", "quantizer_efSearch"):
        if name in params:
            try:
                space.set_index_parameter(index, name, params[name])
            except RuntimeError as error:
                raise ValueError(f"search parameter {name} does not apply to this index: {error}") from None


def search_preassigned(ivf, queries, k, lists, coarse_distances, params):
    """IVF search of `queries` (already transformed) in the given lists per query (-1: none), with
    SearchParametersIVF (selector; nprobe = lists.shape[1]). FAISS's Python wrapper refuses params here, so this
    calls the C++ method."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    lists = np.ascontiguousarray(lists, dtype=np.int64)
    coarse_distances = np.ascontiguousarray(coarse_distances, dtype=np.float32)
    n = len(queries)
    if lists.shape != (n, params.nprobe) or coarse_distances.shape != lists.shape:
        raise ValueError(f"lists {lists.shape} and distances {coarse_distances.shape} must be ({n}, {params.nprobe})")
    distances = np.empty((n, k), dtype=np.float32)
    labels = np.empty((n, k), dtype=np.int64)
    ivf.search_preassigned_c(n, faiss.swig_ptr(queries), k, faiss.swig_ptr(lists), faiss.swig_ptr(coarse_distances),
                             faiss.swig_ptr(distances), faiss.swig_ptr(labels), False, params)
    return distances, labels
