"""A small CounterFact-format file in the pico vocabulary (ROME format, two relations)."""

import json
import sys


def records(n: int = 40) -> list[dict]:
    countries = ["France", "Germany", "Italy", "Spain"]
    langs = ["French", "German", "Italian", "Spanish", "English", "Japanese"]
    recs = []
    for i in range(n):
        c, true = countries[i % 4], langs[i % 4]
        new = langs[(i + 1 + i // 4) % 6]
        new = "Japanese" if new == true else new
        recs.append({
            "case_id": i,
            "requested_rewrite": {"prompt": "The official language of {}", "relation_id": ["P103", "P17"][i % 2],
                                  "subject": c, "target_new": {"str": new}, "target_true": {"str": true}},
            "paraphrase_prompts": [f"the language of {c}", f"the mother tongue of {c}"],
            "neighborhood_prompts": ["the language of Spain"], "attribute_prompts": [], "generation_prompts": []})
    return recs


def write(path) -> None:
    with open(path, "w") as handle:
        json.dump(records(), handle)


if __name__ == "__main__":
    write(sys.argv[1])
