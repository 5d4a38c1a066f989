"""The word classes the semantic gate reads (services/cache/gate.py). Two kinds of list live here and they pull in
opposite directions:

- what may differ: question frames that say the same thing ("how do I", "what are the steps to"), politeness and
  filler, and a short paraphrase table for the words WordNet does not pair (mostly computing vocabulary);
- what must be equal: question words, quantifiers and scope, time words, modality, negation, person, numbers and
  the words that give a relation its direction. These are closed classes of English, listed whole, not examples
  collected from failures; a word outside every list is a content word and must be explained by the other text.
"""

from __future__ import annotations


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Multi-word frames, longest first when matched, replaced by one marker. "@how" is the manner/method question
# however it is put; "@drop" removes the phrase (politeness, framing that asks for the same answer).
FRAMES: dict[str, str] = {}
for _phrase in """how do i|how can i|how should i|how would i|how could i|how do you|how can you|how does one|how to|
how do we|how can we|how should we|how would you|how would one|how is it possible to|how might i|
what is the way to|what is the best way to|what is a good way to|what is the right way to|what is the proper way to|
what is the correct way to|what is the recommended way to|what is the process to|what is the process for|
what are the steps to|what are the steps for|what steps do i take to|what steps should i take to|
what do i do to|what should i do to|what do i need to do to|what is the procedure to|what is the procedure for|
best way to|the best way to|a good way to|steps to|the steps to|is there a way to|is there any way to|
explain how to|show me how to|tell me how to|teach me how to|help me|guide to|a guide to|
in what way can i|in what way do i|what is the simplest way to|what is the easiest way to|simplest way to|
easiest way to|ways to|what are some ways to|what are ways to|what are some good ways to|tips for|tips to|tips on|
what are some tips for|what are some tips to|what are tips for|what is the method for|what is the method to|
method for|method to|what is the trick to|the trick to|code to|code for|the code to|the code for|
what is the technique for|what is the technique to|how can|how could|how do|how does|how would|how should|
how""".replace("\n", "").split("|"):
    FRAMES[_phrase.strip()] = "@how"
for _phrase in ("why", "why should i", "why should we", "why should you", "reasons to", "reasons for",
                "what are the reasons to", "what are the reasons for", "what are some reasons to",
                "what are some reasons for", "give me reasons to", "the reasons to", "for what reason", "how come",
                "what is the reason", "what is the reason that", "what is the reason why", "explain why",
                "tell me why"):
    FRAMES[_phrase] = "@why"
for _phrase in ("how much", "how many", "what number of", "what amount of", "number of", "the number of",
                "amount of", "the amount of", "count of", "the count of"):
    FRAMES[_phrase] = "@how-much"
for _phrase in ("how long", "for how long", "how much time"):
    FRAMES[_phrase] = "@how-long"
for _phrase in ("how often", "how frequently"):
    FRAMES[_phrase] = "@how-often"
for _phrase in ("how far", "what distance", "what is the distance"):
    FRAMES[_phrase] = "@how-far"
for _phrase in ("how old", "what age", "what is the age of"):
    FRAMES[_phrase] = "@how-old"
for _phrase in ("when", "what time", "at what time", "what year", "in what year", "what date", "on what date"):
    FRAMES[_phrase] = "@when"
for _phrase in ("where", "in what place", "what place", "in which place"):
    FRAMES[_phrase] = "@where"
for _phrase in ("who", "whom", "which person", "what person"):
    FRAMES[_phrase] = "@who"
for _phrase in ("whose",):
    FRAMES[_phrase] = "@whose"
for _phrase in ("what", "which", "what is", "what are", "what was", "what were", "which is", "which are"):
    FRAMES[_phrase] = "@what"
# Imperative openers asking for what a "what" question asks; read only where a clause starts ("name" and "list"
# are nouns elsewhere).
OPENING_FRAMES: dict[str, str] = {phrase: "@what" for phrase in (
    "tell me", "tell me about", "can you tell me", "could you tell me", "do you know", "i want to know",
    "i would like to know", "i wonder", "explain", "describe", "define", "give me", "list", "name", "show me",
    "what do you know about", "calculate", "compute")}
for _phrase in ("please", "kindly", "thanks", "thank you", "thank you in advance", "quick question", "hey", "hi",
                "hello", "can you please", "could you please", "would you please", "can you", "could you",
                "would you", "i want to", "i would like to", "i'd like to", "i wish to", "i am trying to",
                "i'm trying to", "trying to", "want to", "to me", "would like to", "in general", "exactly", "actually",
                "basically", "just", "real quick", "for me", "any idea", "any ideas", "in simple terms",
                "simply", "quickly", "briefly", "some help", "a bit", "a little"):
    FRAMES[_phrase] = "@drop"
for _phrase in ("need to", "have to", "has to", "ought to", "supposed to", "must", "should"):
    FRAMES[_phrase] = "@should"
for _phrase in ("going to", "gonna", "will", "shall"):
    FRAMES[_phrase] = "@future"
for _phrase in ("able to", "be able to", "is it possible to", "is it possible for"):
    FRAMES[_phrase] = "@can"
for _phrase in ("right now", "at the moment", "at present"):
    FRAMES[_phrase] = "now"
FRAME_WORDS = {tuple(phrase.split()): marker for phrase, marker in FRAMES.items()}
OPENING_FRAME_WORDS = {tuple(phrase.split()): marker for phrase, marker in OPENING_FRAMES.items()}
# The frame lengths worth trying at a word, longest first.
FRAME_LENGTHS: dict[str, tuple[int, ...]] = {}
for _phrase in (*FRAME_WORDS, *OPENING_FRAME_WORDS):
    FRAME_LENGTHS[_phrase[0]] = tuple(sorted({*FRAME_LENGTHS.get(_phrase[0], ()), len(_phrase)}, reverse=True))

# Question markers that count as the same question word when read from a frame.
QUESTION_MARKERS = frozenset({"@how", "@why", "@how-much", "@how-long", "@how-often", "@how-far", "@how-old",
                              "@when", "@where", "@who", "@whose", "@what"})

CONTRACTIONS = {"can't": "can not", "cannot": "can not", "won't": "will not", "shan't": "shall not",
                "ain't": "is not", "let's": "let us", "i'm": "i am", "it's": "it is", "what's": "what is",
                "where's": "where is", "who's": "who is", "how's": "how is", "that's": "that is",
                "there's": "there is", "here's": "here is", "when's": "when is", "why's": "why is",
                "she's": "she is", "he's": "he is", "i'd": "i would", "i'll": "i will", "i've": "i have"}

# Must be equal in both questions (as a multiset of class values).
QUANTIFIERS = {w: w for w in _words("""all every each any some both either neither single multiple many much few
several most least more less fewer only entire whole every first second third last final other another same
different whichever whatever per""")}
QUANTIFIERS.update({"every": "all", "everything": "all", "everyone": "all", "everybody": "all", "entire": "whole",
                    "anything": "any", "anyone": "any", "anybody": "any", "something": "some", "someone": "some",
                    "somebody": "some", "final": "last"})
TIMES = {w: w for w in _words("""last next this ago yesterday today tomorrow tonight now current currently recent
recently latest upcoming previous previously past future soon later early earlier late still yet already
nowadays formerly morning afternoon evening night weekend weekday monday tuesday wednesday thursday friday
saturday sunday january february april june july august september october november december spring
summer autumn winter daily weekly monthly yearly annually hourly""")}
TIMES.update({"presently": "now", "lately": "recently"})
NEGATIONS = _words("not no never without none nothing nor neither nobody nowhere n't")
MODALS = {"can": "can", "could": "can", "may": "can", "might": "can", "@can": "can", "would": "would",
          "@should": "should", "@future": "will"}
# Auxiliaries and copulas: dropped once their tense is read.
AUXILIARIES = {"do": "", "does": "", "is": "", "are": "", "am": "", "be": "", "being": "", "have": "", "has": "",
               "did": "past", "was": "past", "were": "past", "had": "past", "been": ""}
PERSONS = {"i": "1", "me": "1", "my": "1", "mine": "1", "myself": "1", "we": "1p", "us": "1p", "our": "1p",
           "ours": "1p", "ourselves": "1p", "you": "2", "your": "2", "yours": "2", "yourself": "2",
           "yourselves": "2", "he": "3m", "him": "3m", "his": "3m", "himself": "3m", "she": "3f", "her": "3f",
           "hers": "3f", "herself": "3f", "they": "3p", "them": "3p", "their": "3p", "theirs": "3p",
           "themselves": "3p", "one's": "1"}
# Possessive determiners: they name whose thing it is, and the direction before them points at the noun after
# them ("from my phone to my TV").
DETERMINERS = frozenset({"my", "your", "his", "her", "its", "our", "their"})
# "What do doctors wish their patients knew?" asks what "... wish patients knew?" asks: these point back at a
# noun of the question, not at a person.
ANAPHORIC = frozenset({"its", "their"})
# Words that restate what the question word already asks ("Where is the reef located?").
RESTATING = {"@where": frozenset({"located", "situated", "location", "place"})}
# A relation's direction: the word and what follows it must correspond ("from X to Y" is not "from Y to X").
DIRECTIONS = _words("""to from into onto toward towards out up down over under above below before after between
across through off than inside outside beyond behind within against along around as with for by""")
# Prepositions and conjunctions that a paraphrase swaps freely ("in Python" / "with Python"); they open a phrase
# that may move within the question. ("as", "with", "for", "by" give roles: they are directions above.)
LOOSE_PREPOSITIONS = _words("of in on at about using via")
FILLER = _words("""a an the and that these those there here it its then well ok okay also really very too
actually even generally typically usually simply possible possibly please some-""")
# Direction words that say the same direction.
SAME_DIRECTION = {"into": "to", "towards": "toward"}
OR_WORDS = {"or": "or", "vs": "or", "versus": "or"}
# Words that join clauses: "check if it exists" is not "check because it exists". A question word past a
# clause's first content word joins clauses too ("how do you say X when translating").
LINKERS = {"if": "if", "whether": "if", "unless": "unless", "because": "because", "since": "because",
           "while": "while", "although": "although", "though": "although", "until": "until", "so": "so"}

NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
                "thirteen": "13", "fourteen": "14", "fifteen": "15", "twenty": "20", "thirty": "30", "forty": "40",
                "fifty": "50", "hundred": "100", "thousand": "1000", "million": "1000000",
                "billion": "1000000000", "dozen": "12", "half": "0.5", "twice": "x2", "double": "x2",
                "triple": "x3", "quarter": "0.25", "once": "x1", "percent": "%", "%": "%", "couple": "2",
                "pair": "2"}

# Paraphrases WordNet does not pair, each group one meaning (a word may sit in one group only).
PARAPHRASES: tuple[frozenset[str], ...] = tuple(frozenset(group.split()) for group in (
    "dict dictionary", "dicts dictionaries", "repo repository", "app application", "config configuration",
    "info information", "db database", "js javascript", "ts typescript", "k8s kubernetes", "env environment",
    "var variable", "func function", "param parameter", "arg argument", "dir directory folder",
    "pic picture photo image", "delete remove erase", "merge combine", "make create build",
    "fix repair", "choose pick select", "show display", "begin start", "quick fast rapid", "easy simple",
    "hard difficult tough", "error mistake", "learn study", "cost price", "buy purchase", "kid child",
    "big large", "small little tiny", "car automobile", "doctor physician", "movie film", "phone smartphone",
    "laptop notebook", "pc computer", "email e-mail", "mac macos osx", "website site",
    "web internet online",
    "reverse invert", "check verify", "get obtain", "calculate compute", "string str", "char character",
    "list array", "lists arrays", "kilometers km kilometres", "kilometer kilometre",
    "meters metres", "liters litres", "centimeters centimetres cm", "pounds lbs lb",
    "kilograms kg kilos", "miles mi"))
PARAPHRASE_GROUP: dict[str, frozenset[str]] = {word: group for group in PARAPHRASES for word in group}

# Product and language names in lower case: matched exactly, never through a synonym or a typo ("rust" is not
# "corrosion", "java" not "coffee").
NAMES = _words("""python java javascript typescript rust go golang ruby swift kotlin scala perl php haskell elixir
erlang clojure dart lua julia matlab fortran cobol c c++ c# sql bash zsh powershell html css react vue angular
svelte django flask rails spring node nodejs deno docker kubernetes git github gitlab linux windows macos ios
android ubuntu debian fedora excel word outlook chrome firefox safari edge slack zoom teams aws azure gcp
redis postgres postgresql mysql sqlite mongodb kafka spark pandas numpy tensorflow pytorch json yaml xml csv
pdf iphone ipad mac alexa siri""")
