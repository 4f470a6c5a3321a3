"""Which caption words name an object category: a word list per category name, for MS COCO's
80 categories and the shapes data's 6, and the matcher that finds them in a caption.

The attention localization score (`attention_maps`) asks, for every generated word that names
a category, whether attention lands on an object of it; this module says which words those
are. A category is looked up by its `name` in the instances file, so any COCO-format data set
whose category names are COCO's (or the shapes data's) is scored with no other setting, and
one with other names passes its own table to `CategoryWords`.

Matching. A caption is a list of tokens (lower-cased PTB tokens, as the vocabulary holds
them). An entry may be a phrase ("teddy bear", "hot dog", "stop sign"): at each position the
longest phrase that matches is taken and its tokens consumed, so "teddy bear" names the teddy
bear and not the bear, "hot dog" not the dog. A mention stands at its last token (the head
noun, "bear" of "teddy bear"): the decoding step the score reads attention from.

The COCO lists were written by hand: the category's name, its plural, and the words COCO's
captions commonly use for it ("man", "woman", "kids" for person; "puppy" for dog; "sofa" for
couch); they were not measured against COCO's captions, and they are not exhaustive. Words
too ambiguous to count are left out ("light", "sign", "glass", "board", "computer",
"baseball"). Some that remain name the category in other senses too: "orange" the colour,
"bat" the animal, "table" a table that is not a dining table, "mouse" the animal (COCO's mouse
is a computer's); such a word counts as naming the category, and is a miss where the image
has no object of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from caption_pipeline.data.shapes import CATEGORIES as SHAPES_CATEGORIES
from caption_pipeline.data.shapes import SHAPE_WORDS

# COCO 2017's 80 category names (instances_*2017.json) -> the caption words that name them.
_COCO_TABLE = {
    # person
    "person": "person|persons|people|man|men|woman|women|boy|boys|girl|girls|child|children|"
              "kid|kids|guy|guys|lady|ladies|baby|babies|toddler|toddlers|adult|adults|"
              "gentleman|gentlemen|teenager|teenagers|player|players|skier|skiers|"
              "snowboarder|snowboarders|surfer|surfers|skateboarder|skateboarders|rider|"
              "riders|batter|catcher|pitcher|umpire|couple|crowd",
    # vehicle
    "bicycle": "bicycle|bicycles|bike|bikes",
    "car": "car|cars|taxi|taxis|cab|cabs|suv|sedan",
    "motorcycle": "motorcycle|motorcycles|motorbike|motorbikes|motor bike|motor bikes|"
                  "dirt bike|dirt bikes|scooter|scooters|moped|mopeds",
    "airplane": "airplane|airplanes|plane|planes|jet|jets|airliner|airliners|jetliner|"
                "jetliners|aircraft|aeroplane|aeroplanes",
    "bus": "bus|buses|busses",
    "train": "train|trains|locomotive|locomotives|tram|trams",
    "truck": "truck|trucks|pickup truck|pickup trucks|fire truck|fire trucks|firetruck|lorry",
    "boat": "boat|boats|ship|ships|sailboat|sailboats|canoe|canoes|kayak|kayaks|yacht|yachts|"
            "ferry",
    # outdoor
    "traffic light": "traffic light|traffic lights|stoplight|stoplights|stop light|"
                     "stop lights|traffic signal|traffic signals",
    "fire hydrant": "fire hydrant|fire hydrants|hydrant|hydrants",
    "stop sign": "stop sign|stop signs",
    "parking meter": "parking meter|parking meters",
    "bench": "bench|benches",
    # animal
    "bird": "bird|birds|seagull|seagulls|gull|gulls|pigeon|pigeons|duck|ducks|goose|geese|"
            "swan|swans|parrot|parrots",
    "cat": "cat|cats|kitten|kittens|kitty",
    "dog": "dog|dogs|puppy|puppies",
    "horse": "horse|horses|pony|ponies",
    "sheep": "sheep|lamb|lambs",
    "cow": "cow|cows|cattle|bull|bulls|calf|calves|ox|oxen",
    "elephant": "elephant|elephants",
    "bear": "bear|bears",
    "zebra": "zebra|zebras",
    "giraffe": "giraffe|giraffes",
    # accessory
    "backpack": "backpack|backpacks",
    "umbrella": "umbrella|umbrellas|parasol|parasols",
    "handbag": "handbag|handbags|purse|purses",
    "tie": "tie|ties|necktie|neckties",
    "suitcase": "suitcase|suitcases|luggage",
    # sports
    "frisbee": "frisbee|frisbees",
    "skis": "skis|ski",
    "snowboard": "snowboard|snowboards",
    "sports ball": "ball|balls|soccer ball|tennis ball|beach ball",
    "kite": "kite|kites",
    "baseball bat": "baseball bat|baseball bats|bat|bats",
    "baseball glove": "baseball glove|baseball gloves|glove|gloves|mitt|mitts",
    "skateboard": "skateboard|skateboards",
    "surfboard": "surfboard|surfboards|surf board|surf boards",
    "tennis racket": "tennis racket|tennis rackets|racket|rackets|racquet|racquets",
    # kitchen
    "bottle": "bottle|bottles",
    "wine glass": "wine glass|wine glasses|wineglass|wineglasses",
    "cup": "cup|cups|mug|mugs",
    "fork": "fork|forks",
    "knife": "knife|knives",
    "spoon": "spoon|spoons",
    "bowl": "bowl|bowls",
    # food
    "banana": "banana|bananas",
    "apple": "apple|apples",
    "sandwich": "sandwich|sandwiches|burger|burgers|hamburger|hamburgers",
    "orange": "orange|oranges",
    "broccoli": "broccoli",
    "carrot": "carrot|carrots",
    "hot dog": "hot dog|hot dogs|hotdog|hotdogs",
    "pizza": "pizza|pizzas",
    "donut": "donut|donuts|doughnut|doughnuts",
    "cake": "cake|cakes|cupcake|cupcakes",
    # furniture
    "chair": "chair|chairs",
    "couch": "couch|couches|sofa|sofas",
    "potted plant": "potted plant|potted plants|plant|plants|houseplant|houseplants",
    "bed": "bed|beds",
    "dining table": "dining table|dining tables|table|tables",
    "toilet": "toilet|toilets",
    # electronic
    "tv": "tv|tvs|television|televisions|monitor|monitors",
    "laptop": "laptop|laptops",
    "mouse": "mouse|mice",
    "remote": "remote|remotes|remote control|remote controls|controller|controllers",
    "keyboard": "keyboard|keyboards",
    "cell phone": "cell phone|cell phones|cellphone|cellphones|phone|phones|smartphone|"
                  "smartphones",
    # appliance
    "microwave": "microwave|microwaves",
    "oven": "oven|ovens|stove|stoves",
    "toaster": "toaster|toasters",
    "sink": "sink|sinks",
    "refrigerator": "refrigerator|refrigerators|fridge|fridges",
    # indoor
    "book": "book|books",
    "clock": "clock|clocks",
    "vase": "vase|vases",
    "scissors": "scissors",
    "teddy bear": "teddy bear|teddy bears|teddy|teddies|stuffed animal|stuffed animals",
    "hair drier": "hair drier|hair driers|hair dryer|hair dryers|hairdryer|blow dryer",
    "toothbrush": "toothbrush|toothbrushes",
}  # fmt: skip
COCO_CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    name: tuple(words.split("|")) for name, words in _COCO_TABLE.items()
}
# The shapes data: its categories are the shapes, named by the words its captions use for them.
SHAPES_CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    category["name"]: tuple(
        word for word, shape in SHAPE_WORDS.items() if shape == category["name"]
    )
    for category in SHAPES_CATEGORIES
}
# By category name: no name is in both tables.
CATEGORY_WORDS: dict[str, tuple[str, ...]] = {**COCO_CATEGORY_WORDS, **SHAPES_CATEGORY_WORDS}


class CategoryWords:
    """The words that name some categories, to find in captions (module doc: matching).

    `table`: category name -> its words and phrases. A phrase that names two of the
    categories is a ValueError: a mention must say which object it is about.
    """

    def __init__(self, table: Mapping[str, Iterable[str]]) -> None:
        self.phrases: dict[tuple[str, ...], str] = {}
        for category, words in table.items():
            for word in words:
                phrase = tuple(word.lower().split())
                other = self.phrases.setdefault(phrase, category)
                if not phrase or other != category:
                    raise ValueError(f"word {word!r} names both {other!r} and {category!r}")
        self.longest = max(map(len, self.phrases), default=0)

    @property
    def categories(self) -> set[str]:
        return set(self.phrases.values())

    def mentions(self, tokens: Sequence[str]) -> list[tuple[int, str]]:
        """(index of the mention's last token, category) of each mention in `tokens`, in order."""
        tokens = [token.lower() for token in tokens]
        found, start = [], 0
        while start < len(tokens):
            for length in range(min(self.longest, len(tokens) - start), 0, -1):
                category = self.phrases.get(tuple(tokens[start : start + length]))
                if category is not None:
                    found.append((start + length - 1, category))
                    start += length
                    break
            else:
                start += 1
        return found
