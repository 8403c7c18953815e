"""Seeded text perturbations: character noise and the four EDA operations (Wei & Zou 2019).

Pure functions: the text and a ``random.Random`` in, a new text out; the same text and generator state give the
same result, and no global random state is read or changed. Used by training-time augmentation
(:mod:`ftlab.augment.text`) and by robustness evaluation (text attacks).

    char_noise(text, p, rng, ops=CHAR_OPS) -> str          # each letter perturbed with probability p
    word_deletion(text, p, rng) -> str                      # each word dropped with probability p (EDA's RD)
    synonym_replacement(text, alpha, rng, synonyms=None) -> str   # n words -> a WordNet synonym (EDA's SR)
    random_insertion(text, alpha, rng, synonyms=None) -> str      # n synonyms inserted anywhere (EDA's RI)
    random_swap(text, alpha, rng) -> str                    # n swaps of two words (EDA's RS)
    eda(text, rng, alpha_sr=.1, alpha_ri=.1, alpha_rs=.1, p_rd=.1, synonyms=None) -> str  # one op, chosen at random
    n_changes(alpha, num_words) -> int                      # EDA's n = max(1, int(alpha * num_words)); 0 if alpha 0

``ops`` of :func:`char_noise` (:data:`CHAR_OPS`): ``swap`` (with the next letter of the word), ``insert`` (a
random letter after it), ``delete``, ``keyboard`` (a QWERTY neighbour: a typo). ``synonyms``: a function from a
lower-case word to its synonyms (default: WordNet, :func:`ftlab.utils.wordnet.synonyms`). Words are split at
whitespace and joined with one space; punctuation stays attached to its word and outside the replaced part
("great," -> "outstanding,"), and a capitalised word keeps its capital.

Written here rather than taken from nlpaug 1.1.11 or TextAttack 0.3.11: nlpaug's augmenters sample with the global
``random`` and ``numpy.random`` states (its ``Augmenter.sample`` and ``prob``), so a draw per (seed, epoch,
example) would mean reseeding both process-wide states before every example, in every loader worker; TextAttack pulls in heavy dependencies for its
search-based attacks. The operations themselves are a few lines each.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence

from ftlab.utils.errors import ConfigError

CHAR_OPS = ("swap", "insert", "delete", "keyboard")
EDA_OPS = ("synonym", "insert", "swap", "delete")
Synonyms = Callable[[str], Sequence[str]]

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_WORD = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)
# Wei & Zou's stop-word list (their eda.py): never replaced by a synonym nor used to pick one to insert.
_STOP = """i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers
    herself it its itself they them their theirs themselves what which who whom this that these those am is are
    was were be been being have has had having do does did doing a an the and but if or because as until while of
    at by for with about against between into through during before after above below to from up down in out on
    off over under again further then once here there when where why how all any both each few more most other
    some such no nor not only own same so than too very s t can will just don should now"""
STOP_WORDS = frozenset(_STOP.split())


def _keyboard_neighbours() -> dict[str, str]:
    """QWERTY neighbours of each letter (rows are staggered: a key touches two keys above and two below)."""
    near: dict[str, str] = {}
    for r, row in enumerate(_ROWS):
        for c, key in enumerate(row):
            cells = [(r, c - 1), (r, c + 1), (r - 1, c), (r - 1, c + 1), (r + 1, c - 1), (r + 1, c)]
            near[key] = "".join(_ROWS[i][j] for i, j in cells if 0 <= i < 3 and 0 <= j < len(_ROWS[i]))
    return near


KEYBOARD = _keyboard_neighbours()


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a rate in [0, 1], got {value!r}.")


def n_changes(alpha: float, num_words: int) -> int:
    """EDA's number of words to change: ``max(1, int(alpha * num_words))``; 0 when ``alpha`` or the text is 0."""
    _check_rate("alpha", alpha)
    return max(1, int(alpha * num_words)) if alpha > 0 and num_words > 0 else 0


def _same_case(word: str, like: str) -> str:
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def _default_synonyms(word: str) -> Sequence[str]:
    from ftlab.utils.wordnet import synonyms

    return synonyms(word)


def char_noise(text: str, p: float, rng: random.Random, ops: Sequence[str] = CHAR_OPS) -> str:
    """Each ASCII letter perturbed with probability ``p`` by one of ``ops``, chosen uniformly (typos)."""
    _check_rate("p", p)
    unknown = [op for op in ops if op not in CHAR_OPS]
    if unknown or not ops:
        raise ConfigError(f"Character-noise ops {list(ops)!r}: choose one or more of {list(CHAR_OPS)}.")
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        i += 1
        if char not in string.ascii_letters or rng.random() >= p:
            out.append(char)
            continue
        op = ops[rng.randrange(len(ops))]
        if op == "keyboard":
            out.append(_same_case(rng.choice(KEYBOARD[char.lower()]), char))
        elif op == "insert":
            out += [char, rng.choice(string.ascii_lowercase)]
        elif op == "swap" and i < len(text) and text[i] in string.ascii_letters:
            out += [text[i], char]
            i += 1  # the next letter moved: it is not perturbed again
        elif op == "swap":  # last letter of a word: nothing to swap with
            out.append(char)
        # "delete": nothing appended
    return "".join(out)


def word_deletion(text: str, p: float, rng: random.Random) -> str:
    """Each word dropped with probability ``p``; one random word is kept if all would go (EDA's RD)."""
    _check_rate("p", p)
    words = text.split()
    if not words or p == 0:
        return text
    kept = [word for word in words if rng.random() >= p]
    return " ".join(kept) if kept else words[rng.randrange(len(words))]


def _candidates(words: list[str], synonyms: Synonyms) -> dict[str, Sequence[str]]:
    """Lower-case cores of the non-stop words that have synonyms, in order of first appearance."""
    found: dict[str, Sequence[str]] = {}
    for word in words:
        core = _WORD.match(word).group(2).lower()  # type: ignore[union-attr]  # the pattern matches any string
        if core and core not in STOP_WORDS and core not in found:
            options = synonyms(core)
            if options:
                found[core] = options
    return found


def synonym_replacement(text: str, alpha: float, rng: random.Random, synonyms: Synonyms | None = None) -> str:
    """``n_changes(alpha, words)`` distinct non-stop words replaced, every occurrence, by one random synonym."""
    words = text.split()
    n = n_changes(alpha, len(words))
    found = _candidates(words, synonyms or _default_synonyms) if n else {}
    if not found:
        return text
    chosen = list(found)
    rng.shuffle(chosen)
    replace = {core: rng.choice(list(found[core])) for core in chosen[:n]}
    out = []
    for word in words:
        lead, core, trail = _WORD.match(word).groups()  # type: ignore[union-attr]
        new = replace.get(core.lower())
        out.append(lead + _same_case(new, core) + trail if new else word)
    return " ".join(out)


def random_insertion(text: str, alpha: float, rng: random.Random, synonyms: Synonyms | None = None) -> str:
    """``n_changes(alpha, words)`` times: a synonym of a random non-stop word inserted at a random place."""
    words = text.split()
    n = n_changes(alpha, len(words))
    found = _candidates(words, synonyms or _default_synonyms) if n else {}
    if not found:
        return text
    cores = list(found)
    for _ in range(n):
        new = rng.choice(list(found[rng.choice(cores)]))
        words.insert(rng.randrange(len(words) + 1), new)
    return " ".join(words)


def random_swap(text: str, alpha: float, rng: random.Random) -> str:
    """``n_changes(alpha, words)`` times: two random positions swap their words (EDA's RS)."""
    words = text.split()
    n = n_changes(alpha, len(words))
    if len(words) < 2 or not n:
        return text
    for _ in range(n):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def eda(
    text: str,
    rng: random.Random,
    alpha_sr: float = 0.1,
    alpha_ri: float = 0.1,
    alpha_rs: float = 0.1,
    p_rd: float = 0.1,
    synonyms: Synonyms | None = None,
) -> str:
    """One EDA operation, chosen uniformly among those with a non-zero rate, applied once (as in each of Wei &
    Zou's augmented sentences; their paper's default is 0.1 for all four)."""
    rates = {"synonym": alpha_sr, "insert": alpha_ri, "swap": alpha_rs, "delete": p_rd}
    for name, rate in rates.items():
        _check_rate(f"EDA rate of {name!r}", rate)
    active = [name for name, rate in rates.items() if rate > 0]
    if not active:
        return text
    op = active[rng.randrange(len(active))]
    if op == "synonym":
        return synonym_replacement(text, alpha_sr, rng, synonyms)
    if op == "insert":
        return random_insertion(text, alpha_ri, rng, synonyms)
    if op == "swap":
        return random_swap(text, alpha_rs, rng)
    return word_deletion(text, p_rd, rng)
