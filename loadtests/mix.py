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
