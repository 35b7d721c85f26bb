"""mmcap.metrics against coco-caption: pycocoevalcap's scorers and its Java PTB tokenizer.

The Java comparisons (tokenizer, METEOR, the whole pipeline) run only where `java` is on
PATH and take a few seconds each (a JVM start); everything else is pure Python and fast.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmcap.metrics import (
    CiderD,
    bleu_scores,
    caption_metrics,
    cider_d,
    meteor_scores,
    ptb_tokenize,
    rouge_l,
    tokenize_captions,
)
from mmcap.metrics import meteor as meteor_module
from mmcap.metrics.ptb import PUNCTUATION, ptb_tokenize_lines

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs java on PATH")
METRIC_KEYS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr"]

# ---------------------------------------------------------------- COCO-style captions
# Plain captions as annotators write them, then tricky ones for the tokenizer.
PLAIN_CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "A giraffe standing next to a tree in a field.",
    "Two dogs playing with a frisbee in the park",
    "a kitchen with a stove, a sink and a refrigerator",
    "A bowl of soup sitting on a wooden table.",
    "A red double decker bus driving down a street.",
    "People walking on a sidewalk near tall buildings.",
    "An elephant walking through a grassy field.",
    "A cat sleeping on top of a laptop computer.",
    "A plate of food with broccoli, rice and chicken.",
    "A young boy swinging a baseball bat at a ball.",
    "A train traveling down tracks next to a forest.",
    "Several people flying kites on a windy beach.",
    "A bathroom with a toilet, sink and a mirror.",
    "A woman holding an umbrella in the rain.",
    "A group of zebras grazing in the savanna",
    "A man in a suit and tie standing in an office.",
    "A pizza with pepperoni and cheese on a pan.",
    "Skier going down a snowy slope.",
    "A herd of sheep standing on a lush green hillside.",
    "A close up of a sandwich on a plate",
    "A little girl sitting on a bench eating a donut.",
    "The motorcycle is parked on the side of the road.",
    "Two men playing tennis on a clay court.",
    "A living room filled with furniture and a television.",
    "A stop sign on the corner of a street.",
    "A horse drawn carriage on a city street.",
    "A person riding a skateboard down a ramp.",
    "A large clock tower in the middle of a city.",
    "A dog laying on a bed with a blanket.",
    "An airplane flying through a cloudy blue sky.",
    "A bunch of bananas hanging from a hook.",
    "A boat docked in a harbor at sunset.",
    "Three teddy bears sitting on a shelf.",
    "A fire hydrant on the sidewalk next to a street",
    "A man is using a laptop at a coffee shop.",
    "Cows standing in a field with a barn in the background.",
    "A vase of flowers sitting on a window sill.",
    "A child brushing his teeth in the bathroom.",
    "A snowboarder in mid air doing a trick.",
    "A traffic light hanging over an intersection.",
    "A woman cutting a cake with a knife.",
    "Several cars parked along the curb of a street.",
    "A baseball player throwing a pitch from the mound.",
    "A bird perched on a branch of a tree.",
    "A bed with white sheets in a hotel room.",
    "The kitchen counter is covered with dirty dishes.",
    "A man and a woman posing for a picture.",
    "A bicycle leaning against a brick wall.",
    "An orange cat sitting in a bathroom sink",
    "A tennis player hitting the ball with a racket.",
    "A group of people standing around a table with food.",
    "A parking meter on the side of a road.",
    "Two giraffes eating leaves from the top of a tree.",
    "A street sign that reads Main Street.",
    "A man sitting on a bench reading a newspaper.",
    "A bear walking through the woods.",
    "A polar bear swimming in the water.",
    "An old truck parked in a field of grass.",
    "A computer monitor, keyboard and mouse on a desk.",
    "The woman is holding a hot dog with mustard.",
    "A close-up of a slice of pizza.",
    "Several surfers waiting for a wave in the ocean.",
    "A cutting board with carrots and a knife on it.",
    "A man flying a kite in an open field.",
    "A toilet with the lid up in a small bathroom",
    "Three people riding horses on a beach.",
    "A yellow fire hydrant in the snow.",
    "The elephants are crossing a river together.",
    "A white plate topped with a piece of cake.",
    "A cluttered desk with two computer monitors.",
    "A man holding a cell phone to his ear.",
    "A bus stopped at a bus stop to pick up passengers.",
    "A woman riding a bike down a busy street.",
    "A refrigerator filled with lots of food.",
    "A large jetliner sitting on top of an airport runway.",
    "A skateboarder doing a trick on a rail.",
    "A black and white photo of a city street.",
    "A young man catching a frisbee in the air.",
    "Two zebras standing next to each other.",
    "A clock on the side of a brick building.",
    "A table topped with plates of food and drinks.",
    "A man riding a motorcycle on a dirt road.",
    "A cat looking out of a window.",
    "A little boy holding a teddy bear.",
    "A couple of sheep standing next to a fence.",
    "A plane parked at the gate of an airport.",
    "A group of kids playing soccer on a field.",
    "Some vegetables are sitting in a basket.",
    "A sink and a mirror in a public restroom.",
    "A dog catching a frisbee in its mouth",
    "A surfer wiping out on a large wave.",
    "A herd of elephants walking across a dry field.",
    "A pair of scissors lying on a piece of paper.",
    "A laptop computer sitting on top of a desk.",
    "A man standing on a tennis court holding a racquet.",
    "A kitchen with wooden cabinets and white appliances.",
    "A train pulling into a station platform.",
    "A cake with candles on it for a birthday.",
    "Two people sitting on a bench in a park.",
    "A woman eating a slice of pizza at a table.",
    "An empty street with a red traffic light.",
    "A giraffe bending down to drink water.",
    "A person on skis standing in the snow.",
    "A group of motorcycles parked in a row.",
    "A man wearing a hat and sunglasses.",
    "A large brown bear sitting in the grass.",
    "A small boat floating on a calm lake.",
    "A child sitting at a table eating cereal.",
    "A police officer riding a horse down the street.",
    "Pizza slices on a plate next to a salad.",
    "A bedroom with a bed and a nightstand.",
    "A boy is flying a kite on the beach.",
    "A bowl filled with oranges and apples.",
    "An umbrella on a sandy beach next to the ocean.",
    "A man is skiing down a steep mountain.",
    "A double decker bus parked by the curb.",
    "A cat laying on a couch next to a remote.",
    "A woman and a child making cookies in a kitchen.",
    "A baseball game in progress at a stadium.",
    "Two cats sleeping on a bed together.",
    "A stuffed animal sitting on a chair.",
    "A fruit stand with lots of bananas.",
    "A girl blowing out candles on a cake.",
    "Many people are walking through an airport.",
    "A tall building with a clock on top.",
    "A man riding a horse in a rodeo.",
    "A black dog running on the beach.",
    "a white toilet sitting next to a shower",
    "a man standing next to a motorcycle on a street",
    "a group of people standing on top of a snow covered slope",
    "two plates of food on a table with wine glasses",
    "a person holding a tennis racket on a court",
    "a cat sitting on the hood of a car",
    "a train on the tracks at a station",
    "a large passenger jet flying through the sky",
    "a bunch of boats that are in the water",
    "a baby elephant standing next to its mother",
]

TRICKY_CAPTIONS = [
    # contractions and possessives
    "The dog's owner isn't around, so it's waiting.",
    "A man doesn't want to eat his sister's pizza.",
    "They're sitting on the couch and we've got snacks.",
    "I'm pretty sure that's a zebra, isn't it?",
    "She'll be riding the horse that won't stop.",
    "He'd like the boys' toys and the girls' dolls.",
    "You can't see the cat's tail; it's hidden.",
    "We'd've gone if the bus hadn't left.",
    "The men's room and the women's room.",
    "Don't touch the giraffe's neck!",
    "A DOG CAN'T CLIMB THE TREE.",
    "It’s a cat’s toy and it isn’t broken.",
    "The kids' shoes are on the Joneses' porch.",
    "O'Brien's pub at 5 o'clock.",
    "Rock'n'roll band playing at the McDonald's.",
    "Y'all look at the ma'am with the 'cool' hat.",
    "The '90s style car and the 80's music.",
    "Cannot believe we're gonna see a wanna-be surfer.",
    "A sign saying 'tis the season.",
    "Ain't nobody got time for that dog.",
    # quotes
    "A sign that says \"STOP\" in white letters.",
    "A street sign reading \"Broadway\" and \"5th Ave\".",
    "A man holding a sign that says 'Free Hugs'.",
    "A book titled “The Cat in the Hat” on a table.",
    "A mug that says ‘World’s Best Dad’.",
    "A \"smart\" phone on a 'wooden' desk.",
    "The ``quoted'' word and the `single' one.",
    # parentheses and brackets
    "A cat (black and white) sitting on a chair.",
    "A plate of food (rice, beans) [and salad] {maybe}.",
    "Two people (a man and a woman) walking.",
    "A dog ( brown ) next to a car.",
    "The bus (number 42) is red.",
    # hyphens and dashes
    "A black-and-white photo of a two-story house.",
    "A well-known t-shirt shop in a high-rise building.",
    "A 10-year-old boy with a mother-in-law.",
    "A man -- wearing a hat -- walks by.",
    "A woman — with a dog — sits on a bench.",
    "The score was 3-2 and the ratio 50-50.",
    "A dog - a big one - runs.",
    "An x-ray of a hand and an e-mail on a screen.",
    "A self-portrait of a pro-life anti-war protester.",
    "A state-of-the-art kitchen with a re-enter sign.",
    "A fire_hydrant next to the car-park.",
    "A hot- dog and a -cold drink.",
    "A T-Shirt and an X-Ray and a U.S.-based company.",
    # numbers
    "A clock showing 10:30 on a wall.",
    "A sign that says 25 mph and 1,000 feet.",
    "A pizza cut into 8 slices for $5.99.",
    "A price tag of $100 and 50% off.",
    "Around 3 1/2 pounds of bananas.",
    "A 2.5 liter bottle and .5 cups of sugar.",
    "The 1st place winner and the 2nd and 3rd.",
    "A 1990s computer from the 80s.",
    "A bus with the number 9 on it.",
    "A digital clock reading 12:45:30.",
    "A cake dated 5/12/2015 with 24 candles.",
    "Call 555-123-4567 for a taxi.",
    "A house number 221B on a door.",
    "A 4x4 truck and a 2x4 piece of wood.",
    "A temperature of -5 degrees and +3 later.",
    "A 5ft tall fence with 10km of road.",
    "A stop sign 1/4 mile ahead.",
    "Room 101, floor 3.",
    # abbreviations and acronyms
    "A building in Washington D.C. with a U.S. flag.",
    "Mr. Smith and Dr. Jones at St. Mary's hospital.",
    "A train to New York at 7 a.m. and 5 p.m.",
    "A sign for Main St. and 5th Ave.",
    "Apples, oranges, bananas, etc.",
    "A truck from Acme Inc. and Widgets Co.",
    "A game of Mets vs. Yankees.",
    "A clock, i.e. a timepiece, e.g. a watch.",
    "A U.K. bus next to a U.S.A. car.",
    "A sign reading No. 5 on the door.",
    "The letter A. The letter B.",
    "A man named J. R. R. Tolkien.",
    "Mt. Fuji behind a Jr. high school.",
    "The TV shows a NFL game on ESPN.",
    "AT&T store next to a B&W photo shop.",
    "A sign for the Jan. 5 sale.",
    # punctuation clusters
    "Wait... is that a dog?!",
    "A cat!!! On a roof???",
    "A dog, a cat, and a bird; all friends: wow.",
    "The end....",
    "A. . . pause.",
    "Hello?! Hello!?",
    "A bird.A cat.A dog.",
    "A dog,a cat,a bird",
    "A man ; a woman : a child",
    "An apple .",
    "!!!",
    "...",
    "",
    "   ",
    "-",
    "a",
    # slashes, ampersands, symbols
    "A bike and/or a scooter on a 50/50 split.",
    "Rock & roll music at the bar & grill.",
    "A sign with an arrow -> pointing right.",
    "A shirt with a * star * and a # sign.",
    "An email address foo@bar.com on a screen.",
    "A website www.example.com on a billboard.",
    "Visit http://www.example.com/page today.",
    "A tweet from @user with #hashtag.",
    "A price of 5 € and 3 £ and 10 ¢.",
    "A recipe with ½ cup of milk.",
    "A temperature of 25°C on a sign.",
    "A sign with a © and ® mark.",
    "A man = a woman + a child.",
    "A smiley :) and a frown :( on a board.",
    "Happy face ^_^ drawn on sand.",
    "A score of 10<20 and 30>20.",
    "A heart <3 on a cake.",
    "A file named photo.jpg on a laptop.",
    # unicode and odd whitespace
    "A café with naïve décor and a jalapeño pizza.",
    "Zürich tram in São Paulo style.",
    "A dog 🐶 playing with a ball ⚽.",
    "A sign in 日本語 and English.",
    "  Leading and trailing spaces  ",
    "Multiple   spaces\tand tabs here.",
    "A caption with\na newline inside.",
    "UPPERCASE CAPTION WITH NO PUNCTUATION",
    "lowercase caption with no punctuation at all",
    "MiXeD CaSe CaPtIoN.",
    "A caption ending with a comma,",
    "A caption ending with a question mark?",
    "A caption ending with an exclamation!",
    "A caption ending with a colon:",
    "A caption ending with a semicolon;",
    "A caption ending with a quote\"",
    "A caption ending with an apostrophe'",
    "A caption ending with a dash-",
    "A caption ending with a slash/",
    "A caption ending with a paren)",
    "A caption that ends in an acronym like U.S.",
    "A caption that ends in etc.",
    "A caption that ends in I.",
    "The next caption starts with The.",
    "I.",
    "The man. It is a dog.",
    "A man holding a sign that says I. The dog.",
    "A 'quoted phrase' and a dog's bone.",
    "A dog'sbone and a cat'stoy.",
    "the dogs's toy",
    "a  'n'  b",
    "A sign with --- and ---- dashes.",
    "A dog with a ~ tilde and a ^ caret.",
    "Two dogs (3 1/2 years old) - one's black.",
    "A 3-D movie and hi-fi stereo.",
    "A c++ book and a c# book.",
    "A man's, a woman's, and a child's hats.",
    "Isn't it? Wasn't it? Weren't they?",
]

CAPTIONS = PLAIN_CAPTIONS + TRICKY_CAPTIONS

# ---------------------------------------------------------------- scored images
# 30 images: five references and one prediction each; predictions include exact and
# partial matches, empty-ish ones and unrelated ones.
IMAGES = {
    "surf": (["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
              "Surfer in a black wetsuit riding a wave.", "A person on a surfboard riding a wave.",
              "A man surfing on a big wave."],
             "a man riding a wave on top of a surfboard"),  # exact match, case and period aside
    "giraffe": (["A giraffe standing next to a tree.", "A tall giraffe eating leaves from a tree.",
                 "A giraffe in a field near some trees.", "One giraffe standing in the grass by a tree.",
                 "A giraffe stretches its neck toward a tree."],
                "A giraffe standing next to a tree."),  # exact match
    "frisbee": (["Two dogs playing with a frisbee in the park.", "A pair of dogs chasing a frisbee on the grass.",
                 "Dogs running after a flying disc.", "Two dogs play in a park with a frisbee.",
                 "A brown dog and a white dog fight over a frisbee."],
                "two dogs playing in a park"),  # partial
    "kitchen": (["A kitchen with a stove, a sink and a refrigerator.", "A clean kitchen with white appliances.",
                 "A small kitchen with wooden cabinets.", "An empty kitchen with a stove and a fridge.",
                 "The kitchen has a sink under the window."],
                "a kitchen with a stove and a sink"),  # partial
    "soup": (["A bowl of soup sitting on a wooden table.", "Soup in a white bowl next to a spoon.",
              "A bowl of vegetable soup on a table.", "A hot bowl of soup with bread.",
              "A table with a bowl of tomato soup on it."],
             ""),  # empty
    "bus": (["A red double decker bus driving down a street.", "A double-decker bus on a city street.",
             "A red bus drives past some buildings.", "A tour bus going down the road.",
             "A big red bus in London traffic."],
            "..."),  # punctuation only: empty after tokenising
    "sidewalk": (["People walking on a sidewalk near tall buildings.", "Pedestrians on a busy city sidewalk.",
                  "A crowd of people walking down the street.", "Several people walk past a tall building.",
                  "People are walking on the sidewalk in a city."],
                 "a"),  # one word
    "elephant": (["An elephant walking through a grassy field.", "A large elephant in a field of tall grass.",
                  "An elephant walks across the grass.", "A grey elephant standing in a field.",
                  "A single elephant roaming the savanna."],
                 "the the the the the the"),  # repetition: clipped counts
    "laptop": (["A cat sleeping on top of a laptop computer.", "A cat lying on a laptop keyboard.",
                "A grey cat naps on an open laptop.", "A kitten curled up on a computer.",
                "A cat is laying on a laptop on a desk."],
               "A pizza with pepperoni and cheese on a pan."),  # unrelated
    "broccoli": (["A plate of food with broccoli, rice and chicken.", "Chicken, rice and broccoli on a plate.",
                  "A healthy meal with vegetables and meat.", "A dinner plate with broccoli and rice.",
                  "Cooked chicken with a side of broccoli."],
                 "a plate of chicken and broccoli with rice"),  # partial, reordered
    "baseball": (["A young boy swinging a baseball bat at a ball.", "A kid swings a bat at a baseball.",
                  "A little league player swinging a bat.", "A boy hitting a ball with a bat.",
                  "A child at bat during a baseball game."],
                 "a boy swinging a bat"),
    "train": (["A train traveling down tracks next to a forest.", "A train passes through the woods.",
               "A passenger train on the tracks near trees.", "A long train going by a forest.",
               "A green train on a railway through the trees."],
              "A train traveling down tracks next to a forest."),  # exact match
    "kites": (["Several people flying kites on a windy beach.", "People fly kites at the beach.",
               "Colorful kites in the sky over a beach.", "A group of people flying kites near the ocean.",
               "Kites flying above a sandy beach."],
              "people flying kites on the beach"),
    "bathroom": (["A bathroom with a toilet, sink and a mirror.", "A small bathroom with a white toilet.",
                  "A clean bathroom with a sink and mirror.", "A toilet next to a sink in a bathroom.",
                  "The bathroom has a toilet and a vanity."],
                 "a bathroom with a toilet and a sink"),
    "umbrella": (["A woman holding an umbrella in the rain.", "A lady with an umbrella walking in the rain.",
                  "A woman under a black umbrella on a rainy day.", "A person holds an umbrella on a wet street.",
                  "A woman walks with her umbrella open."],
                 "a man holding a surfboard"),  # unrelated-ish
    "zebras": (["A group of zebras grazing in the savanna.", "Zebras eating grass in a field.",
                "Several zebras standing together in the grass.", "A herd of zebra grazing.",
                "Zebras graze on the dry plains."],
               "a herd of zebras grazing in a field"),
    "office": (["A man in a suit and tie standing in an office.", "A businessman wearing a tie at work.",
                "A man in a suit poses in his office.", "A man wearing a suit and a red tie.",
                "A well-dressed man standing by a desk."],
               "A man wearing a suit and tie."),
    "pizza": (["A pizza with pepperoni and cheese on a pan.", "A pepperoni pizza on a metal tray.",
               "A whole pizza topped with pepperoni.", "A cheese and pepperoni pizza ready to eat.",
               "A large pizza sitting on a pan."],
              "A pepperoni pizza on a pan."),
    "skier": (["Skier going down a snowy slope.", "A person skiing down a mountain.",
               "A skier in a red jacket on the slopes.", "Someone skis down a snow covered hill.",
               "A man skiing down a steep slope."],
              "a person skiing down a snowy hill"),
    "sheep": (["A herd of sheep standing on a lush green hillside.", "Sheep grazing on a green hill.",
               "A flock of sheep in a grassy field.", "Many sheep standing on a hillside.",
               "White sheep on a green slope."],
              "Sheep on a hill."),
    "sandwich": (["A close up of a sandwich on a plate.", "A sandwich cut in half on a white plate.",
                  "A turkey sandwich with lettuce and tomato.", "A plate with a large sandwich.",
                  "A sub sandwich sitting on a plate."],
                 "A sandwich on a plate (cut in half)."),  # parentheses survive as -lrb- -rrb-
    "donut": (["A little girl sitting on a bench eating a donut.", "A young girl eats a doughnut on a bench.",
               "A child enjoying a donut outside.", "A girl on a bench with a pastry.",
               "A small girl eating a sprinkled donut."],
              "A girl's eating a donut -- she's on a bench!"),  # contractions and dashes
    "motorcycle": (["The motorcycle is parked on the side of the road.", "A motorcycle parked by the road.",
                    "A black motorbike on the roadside.", "A motorcycle sits on the shoulder of a road.",
                    "A parked motorcycle next to a street."],
                   "a car parked in a garage"),  # unrelated
    "tennis": (["Two men playing tennis on a clay court.", "Two tennis players on a red clay court.",
                "Men play a game of doubles tennis.", "A tennis match on a clay court.",
                "Two players hitting a tennis ball."],
               "two men playing tennis"),
    "living": (["A living room filled with furniture and a television.", "A living room with a couch and a TV.",
                "A cozy living room with a fireplace.", "A room with sofas and a flat screen TV.",
                "The living room has a large television."],
               "a living room with a couch and a tv"),  # matches a reference after tokenising
    "stop": (["A stop sign on the corner of a street.", "A red stop sign at an intersection.",
              "A stop sign next to a street sign.", "A stop sign on a pole by the road.",
              "A street corner with a stop sign."],
             "A \"STOP\" sign at the corner of 5th St. & Main."),  # quotes, abbreviation, ampersand
    "carriage": (["A horse drawn carriage on a city street.", "A horse pulling a carriage down the road.",
                  "A carriage with a white horse in the city.", "A horse and buggy on a street.",
                  "People riding in a horse-drawn carriage."],
                 "a horse-drawn carriage in the city"),
    "skateboard": (["A person riding a skateboard down a ramp.", "A skateboarder rides down a ramp.",
                    "A man on a skateboard at a skate park.", "A skater going down a half pipe.",
                    "A kid skateboarding on a ramp."],
                   "a man riding a skateboard down a ramp at a skate park on a sunny day with friends"),  # long
    "clock": (["A large clock tower in the middle of a city.", "A clock tower stands over the city.",
               "A tall tower with a clock on it.", "A city square with a big clock tower.",
               "An old clock tower in a downtown area."],
              "A clock tower in a city."),
    "dog_bed": (["A dog laying on a bed with a blanket.", "A dog sleeping on a bed.",
                 "A brown dog resting on a blanket on a bed.", "A puppy curled up in bed.",
                 "A dog lies on top of a bed."],
                "a cat sleeping on a laptop"),  # unrelated
}


def _pycocoevalcap(name: str):
    """A pycocoevalcap scorer class (skips the test when pycocoevalcap is not installed)."""
    module, cls = {
        "Bleu": ("pycocoevalcap.bleu.bleu", "Bleu"),
        "Rouge": ("pycocoevalcap.rouge.rouge", "Rouge"),
        "Cider": ("pycocoevalcap.cider.cider", "Cider"),
        "Meteor": ("pycocoevalcap.meteor.meteor", "Meteor"),
        "PTBTokenizer": ("pycocoevalcap.tokenizer.ptbtokenizer", "PTBTokenizer"),
    }[name]
    return getattr(pytest.importorskip(module), cls)


@pytest.fixture(scope="module")
def tokenized():
    """IMAGES tokenised in pure Python: (keys, candidates, references), aligned."""
    keys = list(IMAGES)
    refs = tokenize_captions({k: IMAGES[k][0] for k in keys})
    preds = tokenize_captions({k: [IMAGES[k][1]] for k in keys})
    return keys, [preds[k][0] for k in keys], [refs[k] for k in keys]


def _coco_inputs(tokenized):
    keys, cands, refs = tokenized
    return {k: r for k, r in zip(keys, refs)}, {k: [c] for k, c in zip(keys, cands)}


# ------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
        ("Don't touch the giraffe's neck!", "do n't touch the giraffe 's neck"),
        ("They're sure it can't be a cat's toy.", "they 're sure it ca n't be a cat 's toy"),
        ("A cat (black and white) on a chair.", "a cat -lrb- black and white -rrb- on a chair"),
        ('A sign that says "STOP" -- in red...', "a sign that says stop in red"),
        ("A black-and-white photo of a 10-year-old.", "a black-and-white photo of a 10-year-old"),
        ("Mr. Smith at 5 p.m. in the U.S. etc.", "mr. smith at 5 p.m. in the u.s. etc."),
        ("Around 3 1/2 pounds for $5.99, 50% off.", "around 3\u00a01/2 pounds for $ 5.99 50 % off"),
        ("Cannot believe we're gonna see it.", "can not believe we 're gon na see it"),
        ("A café 🐶 with “curly” quotes — and a dash.", "a café with curly quotes and a dash"),
        ("Wow!!! A cat?!", "wow !!! a cat ?!"),  # runs of ! and ? are tokens coco-caption keeps
        ("...", ""),
    ],
)
def test_ptb_tokenize_examples(raw, expected):
    assert ptb_tokenize(raw) == expected


def test_one_letter_acronym_looks_at_the_next_caption():
    # Java lexes all captions as one file: "I." before a line starting "The" is "I" + "."
    assert ptb_tokenize_lines(["A sign that says I.", "The dog."]) == ["a sign that says i", "the dog"]
    assert ptb_tokenize_lines(["A sign that says I.", "the dog."]) == ["a sign that says i.", "the dog"]


def test_tokenize_captions_keeps_keys_order_and_lengths():
    out = tokenize_captions({"b": ["Two dogs.", "A cat!"], 3: ["A bird?"], "empty": []})
    assert out == {"b": ["two dogs", "a cat"], 3: ["a bird"], "empty": []}
    with pytest.raises(TypeError):
        tokenize_captions({"a": "a bare string"})


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_tokenizer_output_is_one_clean_line(text):
    out = ptb_tokenize(text)
    assert "\n" not in out and out == out.strip()
    assert not set(out.split(" ")) & PUNCTUATION


@needs_java
def test_ptb_tokenizer_equals_java_on_coco_style_captions():
    PTBTokenizer = _pycocoevalcap("PTBTokenizer")
    images = {i: CAPTIONS[i : i + 5] for i in range(0, len(CAPTIONS), 5)}  # as coco-caption groups them
    with contextlib.redirect_stderr(io.StringIO()):
        java = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in images.items()})
    ours = tokenize_captions(images)
    mismatches = [(c, j, o) for k in images for c, j, o in zip(images[k], java[k], ours[k]) if j != o]
    assert not mismatches
    assert len(CAPTIONS) >= 250


# ------------------------------------------------------------- scorers vs pycocoevalcap


def test_bleu_equals_pycocoevalcap(tokenized, capsys):
    Bleu = _pycocoevalcap("Bleu")
    gts, res = _coco_inputs(tokenized)
    corpus, per_image = bleu_scores(tokenized[1], tokenized[2])
    assert capsys.readouterr().out == ""  # pycocoevalcap's Bleu prints; ours must not
    expected_corpus, expected_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    np.testing.assert_allclose(corpus, expected_corpus, rtol=0, atol=1e-6)
    np.testing.assert_allclose(per_image, np.array(expected_per_image).T, rtol=0, atol=1e-6)
    assert per_image[0, 3] == pytest.approx(1.0)  # "surf" predicts a reference exactly


def test_rouge_l_equals_pycocoevalcap(tokenized):
    Rouge = _pycocoevalcap("Rouge")
    gts, res = _coco_inputs(tokenized)
    corpus, per_image = rouge_l(tokenized[1], tokenized[2])
    expected_corpus, expected_per_image = Rouge().compute_score(gts, res)
    assert corpus == pytest.approx(expected_corpus, abs=1e-6)
    np.testing.assert_allclose(per_image, expected_per_image, rtol=0, atol=1e-6)


def test_cider_d_equals_pycocoevalcap(tokenized):
    Cider = _pycocoevalcap("Cider")
    gts, res = _coco_inputs(tokenized)
    corpus, per_image = cider_d(tokenized[1], tokenized[2])
    expected_corpus, expected_per_image = Cider().compute_score(gts, res)
    assert corpus == pytest.approx(expected_corpus, abs=1e-6)
    np.testing.assert_allclose(per_image, expected_per_image, rtol=0, atol=1e-6)
    assert per_image[tokenized[0].index("soup")] == 0.0  # the empty prediction


@needs_java
@pytest.mark.slow
def test_meteor_equals_pycocoevalcap(tokenized):
    Meteor = _pycocoevalcap("Meteor")
    gts, res = _coco_inputs(tokenized)
    corpus, per_image = meteor_scores(tokenized[1], tokenized[2])
    expected_corpus, expected_per_image = Meteor().compute_score(gts, res)
    assert corpus == pytest.approx(expected_corpus, abs=1e-6)
    np.testing.assert_allclose(per_image, expected_per_image, rtol=0, atol=1e-6)


@needs_java
@pytest.mark.slow
def test_caption_metrics_equals_the_coco_caption_pipeline():
    """Raw captions in; the same numbers as pycocoevalcap's Java tokenizer plus its scorers."""
    PTBTokenizer, Bleu, Meteor, Rouge, Cider = map(_pycocoevalcap, ["PTBTokenizer", "Bleu", "Meteor", "Rouge", "Cider"])
    with contextlib.redirect_stderr(io.StringIO()):
        gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in refs] for k, (refs, _) in IMAGES.items()})
        res = PTBTokenizer().tokenize({k: [{"caption": pred}] for k, (_, pred) in IMAGES.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = dict(zip(METRIC_KEYS[:4], bleu))
    expected["METEOR"] = Meteor().compute_score(gts, res)[0]
    expected["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]

    ours = caption_metrics({k: refs for k, (refs, _) in IMAGES.items()}, {k: p for k, (_, p) in IMAGES.items()})
    assert list(ours) == METRIC_KEYS
    assert ours == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------- caption_metrics API


def test_caption_metrics_keys_and_types_without_meteor(capsys):
    refs = {k: r for k, (r, _) in IMAGES.items()}
    preds = {k: p for k, (_, p) in IMAGES.items()}
    out = caption_metrics(refs, preds, meteor=False)
    assert list(out) == METRIC_KEYS
    assert out["METEOR"] is None
    assert all(isinstance(out[k], float) for k in METRIC_KEYS if k != "METEOR")
    assert 0 < out["BLEU-4"] < out["BLEU-1"] < 1 and 0 < out["ROUGE_L"] < 1 and out["CIDEr"] > 0
    assert capsys.readouterr().out == ""


def test_caption_metrics_perfect_predictions():
    refs = {"a": ["A dog on a red couch.", "A brown dog on a sofa."], "b": ["Two cats.", "A pair of cats."]}
    out = caption_metrics(refs, {"a": "a dog on a red couch", "b": "Two cats!"}, meteor=False)
    assert out["BLEU-1"] == pytest.approx(1.0) and out["ROUGE_L"] == pytest.approx(1.0)


def test_meteor_is_none_not_zero_without_java(monkeypatch, caplog):
    monkeypatch.setattr(meteor_module.shutil, "which", lambda name: None)
    meteor_module._warn_unavailable.cache_clear()
    refs = {"a": ["A dog on a couch."], "b": ["Two cats."]}
    preds = {"a": "a dog", "b": "two cats"}
    with caplog.at_level(logging.WARNING, logger="mmcap.metrics.meteor"):
        first = caption_metrics(refs, preds)
        second = caption_metrics(refs, preds)
    assert first["METEOR"] is None and second["METEOR"] is None
    assert first["BLEU-1"] > 0
    warnings = [r for r in caplog.records if "METEOR" in r.getMessage()]
    assert len(warnings) == 1 and "java" in warnings[0].getMessage()


def test_mismatched_keys_raise_and_name_them():
    refs = {"a": ["A dog."], "b": ["A cat."]}
    with pytest.raises(ValueError, match=r"missing predictions for \['b'\].*without references for \['z'\]"):
        caption_metrics(refs, {"a": "a dog", "z": "a zebra"}, meteor=False)
    with pytest.raises(ValueError, match="no reference captions"):
        caption_metrics({"a": []}, {"a": "a dog"}, meteor=False)
    with pytest.raises(ValueError, match="no captions"):
        caption_metrics({}, {}, meteor=False)


# ------------------------------------------------------- CIDEr-D with corpus frequencies


def test_cider_d_single_image_needs_corpus_document_frequencies(tokenized):
    Cider = _pycocoevalcap("Cider")
    keys, cands, refs = tokenized
    i = keys.index("frisbee")
    # coco-caption style: df from the one image scored, so every n-gram is in every document
    assert Cider().compute_score({0: refs[i]}, {0: [cands[i]]})[0] == 0.0
    assert CiderD().score([cands[i]], [refs[i]])[0] == 0.0
    # document frequencies from a training corpus give a real reward
    scorer = CiderD(corpus_references=refs)
    assert scorer.score([cands[i]], [refs[i]])[0] > 0.5
    # and with the scored images as the corpus, it is coco-caption's CIDEr-D again
    np.testing.assert_allclose(scorer.score(cands, refs), cider_d(cands, refs)[1], rtol=0, atol=1e-9)


def test_cider_d_scores_k_samples_per_image(tokenized):
    _, _, refs = tokenized
    scorer = CiderD(corpus_references=refs)
    samples = ["a man riding a wave", "a dog on a surfboard", "a man riding a wave", "", "surfer"]
    rewards = scorer.score(samples + samples[:2], [refs[0]] * 5 + [refs[1]] * 2)
    assert rewards.shape == (7,) and rewards.dtype == np.float64
    assert rewards[0] == rewards[2] > rewards[1] > 0 and rewards[3] == 0.0
    np.testing.assert_array_equal(scorer.score(samples, [refs[0]] * 5), rewards[:5])  # cached refs, same result
    with pytest.raises(ValueError):
        scorer.score(["a"], [])
