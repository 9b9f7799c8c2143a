"""The --mix option: which answers the load asks for, and in what proportions."""
ANSWERS = ("similar", "embedding")


def parse_mix(text):
    """"similar=0.8,embedding=0.2" -> {"similar": 0.8, "embedding": 0.2}; a name alone weighs 1."""
    mix = {}
    for part in filter(None, text.split(",")):
        name, _, weight = part.partition("=")
        if name.strip() not in ANSWERS:
            raise ValueError(f"--mix names {name!r}; use {' and '.join(ANSWERS)}")
        mix[name.strip()] = float(weight or 1)
    if not mix or sum(mix.values()) <= 0:
        raise ValueError(f"--mix {text!r} gives no weight to any answer")
    return mix


def schedule(mix, slots=10):
    """The answers of `mix` spread evenly over `slots` requests, e.g. 0.7/0.3 -> s e s s e s s e s s (every
    name gets at least one slot): a user that walks it, from any start, sends the exact proportions."""
    total = sum(mix.values())
    counts = {name: max(1, round(slots * weight / total)) for name, weight in mix.items() if weight > 0}
    return [name for _, name in sorted(((i + 0.5) / n, name) for name, n in counts.items() for i in range(n))]
