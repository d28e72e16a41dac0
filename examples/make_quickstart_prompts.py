"""Writes examples/quickstart_prompts.jsonl: the built-in example's prompts, made by code for this project.

The demo has to distil a 135M teacher on 2 CPU cores in minutes, so it focuses on one task a small
student can learn in that budget: short, plain explanations of everyday things. Topics x phrasings
give a few hundred varied instructions; the test split holds prompts the student never trained on.

    python examples/make_quickstart_prompts.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = """
a volcano|the moon|the sun|a rainbow|photosynthesis|gravity|a cloud|rain|snow|thunder|lightning|an earthquake|
a desert|a forest|an ocean|a river|a mountain|a glacier|a tornado|a hurricane|wind|the sky|a star|a planet|
a comet|the Earth|a tree|a flower|a seed|a leaf|grass|a mushroom|a bee|an ant|a butterfly|a spider|a bird|
an eagle|a penguin|an owl|a fish|a shark|a whale|a dolphin|an octopus|a frog|a snake|a turtle|a dog|a cat|
a horse|a cow|a sheep|an elephant|a lion|a tiger|a giraffe|a monkey|a bear|a rabbit|a bat|a camel|
bread|cheese|milk|an apple|a banana|an orange|rice|pasta|chocolate|honey|coffee|tea|soup|salt|sugar|
a bicycle|a car|a train|an airplane|a ship|a bus|a bridge|a road|a tunnel|a lighthouse|a castle|a library|
a hospital|a school|a museum|a farm|a market|a kitchen|a garden|a park|
a computer|a phone|a camera|a clock|a calendar|a map|a compass|a book|a pencil|a newspaper|a letter|
a battery|a light bulb|a magnet|a mirror|a window|a door|a chair|a table|a bed|an umbrella|a key|a lock|
a doctor|a teacher|a farmer|a baker|a pilot|a firefighter|a nurse|a chef|an artist|a scientist|an engineer|
a musician|a carpenter|a gardener|a librarian|
music|a song|a drum|a piano|a guitar|a painting|a poem|a story|a game|soccer|swimming|running|chess|
a holiday|a birthday|a friend|a family|a neighbour|a team|a city|a village|a country|a language|
money|a bank|a shop|a job|a week|a year|a season|summer|winter|spring|autumn|the morning|the night|
water|ice|steam|fire|air|soil|sand|a rock|iron|gold|wood|paper|glass|plastic|a recipe|a vegetable|a fruit|
sleep|breakfast|exercise|a habit|a smile|a dream|a question|an idea|a plan|a map app|the internet|an email
"""

# Every phrasing asks for one sentence: a 135M teacher answers that cleanly with greedy decoding
# (asked for "a short answer" it rambles into loops), and one clean sentence is what a small student
# can learn to write in a CPU-minutes budget.
PHRASINGS = [
    "What is {topic}? Answer in one sentence.",
    "Explain {topic} in one sentence.",
    "Describe {topic} in one simple sentence.",
    "Tell me one interesting fact about {topic} in one sentence.",
    "In one sentence, how would you explain {topic} to a child?",
    "In one sentence, why is {topic} useful or important?",
]


def main(out: Path = Path(__file__).with_name("quickstart_prompts.jsonl"), per_topic: int = 2) -> None:
    rng = random.Random(0)
    topics = [t.strip() for t in TOPICS.replace("\n", "").split("|") if t.strip()]
    rows = []
    for topic in topics:
        for phrasing in rng.sample(PHRASINGS, per_topic):
            rows.append({"prompt": phrasing.format(topic=topic)})
    rng.shuffle(rows)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} prompts from {len(topics)} topics -> {out}")


if __name__ == "__main__":
    main()
