"""User messages for simulated runs: a built-in set, a train/held-out split, and prompt files.

The built-in :data:`PROMPTS` were written for prefloop: everyday requests, advice,
explanations, opinions and short tasks, varied in topic and phrasing so an oracle's
preference is learned across many kinds of answer rather than for one question.

A prompt file (``--prompts FILE``) holds one prompt per line; a file whose name ends in
``.jsonl`` holds one JSON object ``{"prompt": "..."}`` per line instead, for prompts that
span several lines. Blank lines are skipped in both. Prompts are single user messages:
multi-turn contexts are not read.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

PROMPTS: tuple[str, ...] = (
    # Everyday requests
    "What can I cook tonight with rice, eggs and a bag of frozen peas?",
    "Give me a simple weekly cleaning schedule for a two-bedroom flat.",
    "How do I get a red wine stain out of a cotton shirt?",
    "Suggest three board games for a family with kids aged six and ten.",
    "What should I pack for a three-day hiking trip in early autumn?",
    "How long should I boil an egg if I want the yolk slightly runny?",
    "Help me plan a cheap birthday party for a seven-year-old.",
    "What is a good way to store fresh herbs so they last longer?",
    "My houseplant's leaves are turning yellow. What could be wrong?",
    "How can I make my small bedroom feel less cluttered?",
    "Suggest a vegetarian lunch I can prepare the night before work.",
    "What are some quiet hobbies I could pick up in a small apartment?",
    "How do I unclog a slow bathroom sink without harsh chemicals?",
    "Recommend a few easy indoor plants for a room with little light.",
    "What is a polite way to ask my neighbour to turn their music down?",
    "Give me a shopping list for a week of simple breakfasts.",
    "How do I fold a fitted sheet neatly?",
    "What can I do on a rainy Sunday with two bored teenagers?",
    "How often should I water a cactus?",
    "Suggest a name for a grey rescue cat with a grumpy face.",
    "What is the easiest way to keep track of household bills?",
    "How do I remove rust from an old cast iron pan?",
    "Plan a relaxed one-day itinerary for a first visit to a seaside town.",
    "What should I bring to a potluck if I cannot cook?",
    "How can I keep my phone battery healthy over the years?",
    # Advice
    "I keep procrastinating on my thesis. Any practical tips to get started each day?",
    "How do I tell my manager I am overloaded without sounding like I am complaining?",
    "I have a job interview tomorrow for a junior accountant role. How should I prepare?",
    "My friend always cancels plans at the last minute. Should I say something?",
    "What is a sensible way to start saving money on a small salary?",
    "I want to start running but I get out of breath after two minutes. What should I do?",
    "How can I become more comfortable speaking up in meetings?",
    "I am moving to a new city where I know nobody. How do I make friends?",
    "What should I consider before adopting a dog?",
    "How do I politely decline a wedding invitation?",
    "I feel tired every afternoon at work. What habits might help?",
    "How should I ask for a raise after my first year in a job?",
    "My teenager spends all evening on their phone. How can I talk to them about it?",
    "What questions should I ask when viewing a flat to rent?",
    "I have two job offers: one pays more, the other has a shorter commute. How do I decide?",
    "How can I stop checking my email every five minutes?",
    "What is a good routine for learning a language for twenty minutes a day?",
    "How do I give honest feedback to a colleague whose work keeps arriving late?",
    "I want to read more books this year. How can I build the habit?",
    "What should I do if I disagree with my doctor's advice?",
    "How do I keep a long-distance friendship going?",
    "I get nervous before exams even when I know the material. Any advice?",
    "Is it better to pay off a small debt first or the one with the highest interest?",
    "How do I say no to extra projects without hurting my career?",
    "What is a kind way to end a conversation with someone who talks too long?",
    "I am starting my first job as a team lead. What mistakes should I avoid?",
    "How can I sleep better when my neighbours are noisy?",
    "Should I learn to touch type, and how long does it take?",
    "How do I prepare for a difficult conversation with my landlord about repairs?",
    "What is a healthy way to deal with envy when friends post about their success?",
    # Explanations
    "Why is the sky blue?",
    "Explain how a vaccine trains the immune system, in simple terms.",
    "What is the difference between weather and climate?",
    "How does a refrigerator keep food cold?",
    "Why do we have leap years?",
    "Explain compound interest with a small example.",
    "What makes bread rise?",
    "How do noise-cancelling headphones work?",
    "Why does ice float on water?",
    "What is inflation and why do prices go up over time?",
    "Explain what a black hole is to a ten-year-old.",
    "How does GPS know where my phone is?",
    "Why do onions make people cry?",
    "What is the difference between a virus and a bacterium?",
    "How do solar panels turn sunlight into electricity?",
    "Explain recursion using an everyday example.",
    "Why do cats purr?",
    "What does a central bank actually do?",
    "How do tides work?",
    "Why do some people get seasick while others do not?",
    "What is the difference between RAM and storage in a computer?",
    "Explain photosynthesis in three sentences.",
    "How does a bill become a law in a typical parliament?",
    "Why do leaves change colour in autumn?",
    "What is an index fund?",
    "How do airplanes stay in the air?",
    "What causes thunder?",
    "Explain the difference between 'affect' and 'effect'.",
    "How does public-key encryption let two strangers share a secret?",
    "Why is it hotter in summer if the Earth is not closer to the sun then?",
    "What is a calorie, exactly?",
    "How do bees make honey?",
    "What is machine learning, in plain words?",
    "Why does metal feel colder than wood at the same temperature?",
    "How does a credit score work?",
    "What is the greenhouse effect?",
    "Explain what DNS does when I type a web address.",
    "Why do we yawn?",
    "What is the difference between a simile and a metaphor?",
    "How do vaccines differ from antibiotics?",
    "What happens in the body when we exercise?",
    "How does a microwave oven heat food?",
    "Why do stars twinkle but planets mostly do not?",
    "What is supply and demand?",
    "How do earthquakes happen?",
    # Opinions
    "Is it worth learning to play the piano as an adult?",
    "Which is better for a first pet: a cat or a dog?",
    "Do you think remote work is good for young employees?",
    "Are electric cars really better for the environment?",
    "What is the most underrated invention of the last hundred years?",
    "Is breakfast really the most important meal of the day?",
    "Should children learn to code in primary school?",
    "What makes a good teacher?",
    "Is it better to rent or buy a home in your twenties?",
    "Are e-readers as good as paper books?",
    "What is the best season of the year, and why?",
    "Should tipping be replaced by higher wages?",
    "Is it rude to use your phone at the dinner table?",
    "What makes a city pleasant to live in?",
    "Are New Year's resolutions useful or a waste of time?",
    "Is it better to specialise early in a career or try many things?",
    "What is more important in a friendship: honesty or loyalty?",
    "Do video games help or harm children?",
    "Should museums be free to visit?",
    "Is handwriting still worth teaching?",
    "What makes a story memorable?",
    "Is it better to travel slowly in one country or quickly through several?",
    "Are open-plan offices a good idea?",
    "Would you rather have more free time or more money?",
    "What is one habit everyone should have?",
    # Short tasks
    "Write a two-line poem about morning coffee.",
    "Summarise the plot of Cinderella in one sentence.",
    "Turn this into a polite email: 'send me the report today'.",
    "Give me five synonyms for 'happy'.",
    "Write a short thank-you note to a neighbour who watered my plants.",
    "Translate 'Where is the train station?' into French and Spanish.",
    "Make up a riddle whose answer is 'a shadow'.",
    "Write a haiku about a city at night.",
    "Suggest a catchy title for a blog post about budget travel.",
    "Rewrite this sentence to be clearer: 'The meeting that was planned was moved because "
    "of the fact that people were not available.'",
    "List four questions to break the ice at a team lunch.",
    "Write a limerick about a forgetful wizard.",
    "Give me a one-paragraph bio for a freelance graphic designer.",
    "Draft a tweet announcing a small bakery's new opening hours.",
    "What rhymes with 'orange'?",
    "Write a short, friendly out-of-office reply.",
    "Give me three ideas for a science fair project about plants.",
    "Create a motivational quote about learning from mistakes.",
    "Write a product description for a reusable water bottle.",
    "Invent a name for a fantasy kingdom built on floating islands.",
    "Write the opening sentence of a mystery novel.",
    "Turn 'buy milk, call mum, pay rent' into a neat to-do list.",
    "Give me a tongue twister about seagulls.",
    "Write a short apology for missing a friend's call.",
    "Suggest a toast for my parents' thirtieth wedding anniversary.",
    "Write a four-line poem about autumn leaves for a child.",
    "Describe the smell of rain in one sentence.",
    "Give me a fun fact about octopuses.",
    "Write a two-sentence horror story set in a library.",
    "Make this sound more confident: 'I think I might be able to help, maybe.'",
    # Maths, logic and numbers
    "What is 15 percent of 80?",
    "If a train travels 120 kilometres in 1.5 hours, what is its average speed?",
    "How many seconds are there in a day?",
    "Is 91 a prime number?",
    "Convert 25 degrees Celsius to Fahrenheit.",
    "I have 3 red socks and 5 blue socks in a drawer. How many must I take to be sure of a pair?",
    "What is the area of a circle with a radius of 4 centimetres?",
    "Split a 64 euro restaurant bill among 5 people with a 10 percent tip.",
    "Explain how to find the average of a list of numbers.",
    "If I save 50 a month, how long until I have 1,000?",
    "What comes next in the sequence 2, 6, 12, 20, 30?",
    "How many minutes is 3.75 hours?",
    "A shirt costs 40 after a 20 percent discount. What was the original price?",
    "What is the square root of 144, and how can I check it?",
    "Roughly how many litres of water does a five-minute shower use?",
    # Technology and computers
    "What is the difference between Wi-Fi and mobile data?",
    "How do I make a strong password I can still remember?",
    "My laptop is running slowly. What should I check first?",
    "What does it mean when a website says 'accept cookies'?",
    "How do I back up the photos on my phone?",
    "Write a Python function that reverses a string.",
    "What is the difference between a list and a tuple in Python?",
    "Explain what an API is with a restaurant analogy.",
    "How can I spot a phishing email?",
    "What is version control and why do programmers use it?",
    "How do I take a screenshot on a laptop?",
    "What is the cloud, in simple words?",
    "Write a SQL query that counts the rows in a table called orders.",
    "Why do software updates matter for security?",
    "What is two-factor authentication and should I turn it on?",
    # Health and wellbeing (general)
    "What are some easy stretches for someone who sits at a desk all day?",
    "How much water should an adult drink in a day?",
    "What are simple ways to eat more vegetables?",
    "How can I calm down quickly before a presentation?",
    "What is a good warm-up before playing football?",
    "Why is sleep important for memory?",
    "Give me a ten-minute bodyweight workout I can do at home.",
    "How can I reduce the time I spend staring at screens?",
    "What are the benefits of walking every day?",
    "How do I make a habit of stretching in the morning?",
    # Culture, history and language
    "Who built the pyramids of Giza, and how do we know?",
    "Why did the Roman Empire split into east and west?",
    "What is the origin of the word 'quarantine'?",
    "Recommend three classic novels for someone who usually reads thrillers.",
    "What is the difference between British and American spelling?",
    "Why do many languages have gendered nouns?",
    "What was the printing press's biggest effect on Europe?",
    "Explain what jazz improvisation is to someone who has never played music.",
    "What are some good habits for learning new vocabulary?",
    "Why is Shakespeare still studied in schools?",
    "What is the difference between a museum and a gallery?",
    "How did people tell the time before clocks?",
    "What is the story behind the Olympic rings?",
    "Why do we say 'bless you' when someone sneezes?",
    "What is a palindrome? Give a few examples.",
    # Work, study and money
    "How do I write a good cover letter for an internship?",
    "What should a simple monthly budget include?",
    "How can I take better notes during lectures?",
    "What is the difference between gross and net income?",
    "How do I prepare a five-minute presentation on a topic I barely know?",
    "What makes a CV easy to read?",
    "How can a small business get its first customers?",
    "What is a pension and when should I start thinking about one?",
    "How should I structure a persuasive essay?",
    "What is the best way to revise for a maths exam?",
    "How do I run a short, useful team meeting?",
    "Explain the difference between a loan and a line of credit.",
    "How can I negotiate the price of a used car?",
    "What should I include in a handover note before going on leave?",
    "How do I estimate how long a project will take?",
    # Nature, science and curiosities
    "Why do birds migrate?",
    "How do whales sleep without drowning?",
    "What is the tallest tree species in the world?",
    "Why is the ocean salty but rivers are not?",
    "How do fireflies glow?",
    "What would happen if the Moon disappeared?",
    "Why do we see lightning before we hear thunder?",
    "How do chameleons change colour?",
    "What is the hottest planet in the solar system, and why?",
    "How do plants know which way is up?",
    "Why do dogs wag their tails?",
    "How are rainbows formed?",
    "What is the difference between a meteor and a meteorite?",
    "Why do some animals hibernate?",
    "How old is the universe, and how do scientists know?",
)


class PromptError(ValueError):
    """A prompt file is missing, empty or has a line that is not a prompt."""


def split_prompts(prompts: Sequence[str], held_out: float = 0.2,
                  seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Shuffle with ``seed`` and split into (train, held-out).

    Held-out prompts never reach training, so comparing adapters on them measures what
    generalises. The held-out part is ``round(len * held_out)`` prompts, at least one and at
    most all but one, so both parts are non-empty. Duplicates are an error: a prompt in both
    parts would leak training prompts into the evaluation.
    """
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be between 0 and 1 (exclusive), got {held_out!r}")
    if len(prompts) < 2:
        raise ValueError(f"need at least 2 prompts to split, got {len(prompts)}")
    if len(set(prompts)) != len(prompts):
        raise ValueError("prompts repeat: remove duplicates so train and held-out are disjoint")
    order = list(prompts)
    random.Random(seed).shuffle(order)
    k = min(max(round(len(order) * held_out), 1), len(order) - 1)
    return tuple(order[k:]), tuple(order[:k])


def read_prompts(path: Path | str) -> tuple[str, ...]:
    """Prompts from a file: one per line, or ``{"prompt": "..."}`` per line in a ``.jsonl``.

    Surrounding whitespace is stripped and blank lines skipped. A missing or empty file, a
    bad JSON line, a non-string or blank prompt, or a repeated prompt raises
    :class:`PromptError` naming the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PromptError(f"prompt file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"prompt file {path} cannot be read: {exc}") from None
    jsonl = path.suffix.lower() == ".jsonl"
    prompts: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        prompt = _json_prompt(line, f"{path}:{number}") if jsonl else line.strip()
        if prompt in seen:
            raise PromptError(f"{path}:{number}: repeats the prompt on line {seen[prompt]}")
        seen[prompt] = number
        prompts.append(prompt)
    if not prompts:
        raise PromptError(f"prompt file {path} has no prompts")
    return tuple(prompts)


def _json_prompt(line: str, where: str) -> str:
    """The prompt in one JSONL line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PromptError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict) or "prompt" not in record:
        raise PromptError(f'{where}: expected an object like {{"prompt": "..."}}')
    prompt = record["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError(f"{where}: the prompt must be a non-empty string, got {prompt!r}")
    return prompt.strip()
