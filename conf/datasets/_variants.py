"""How conf/datasets/names/*.yaml were made, and the exclusions of ImageNet's variants.

Usage: python conf/datasets/_variants.py   (reads the dataset YAMLs next to this file)

The names files give the text filter the ways captions name fine-grained classes (see
``pipeline.core.config.load_dataset``): ``variants`` (more names of one class), ``families``
(a name several classes share: the caption is kept with all of them and the image stage picks
one), ``kind_words`` and ``class_kinds`` (body types, species: a caption's kind word rules out
the classes of other kinds), ``class_years`` and ``max_year_gap``. They are derived from the
class names by the rules below, plus the curated tables (other names of makes and models, the
odd class names the parser cannot split).

- StanfordCars: a class name is ``make model [body] year``. The make is one of MAKES; the year
  its last token; the body the longest of BODIES at its end (none for names such as ``Chevrolet
  Corvette ZR1 2012``, whose kind is in KINDS). The model is split into a line and a trim
  (LINES): ``make line`` names every class of the line (``Audi S5``: a family of two),
  ``make line trim`` the classes of that trim. Each make is also written its other ways
  (MAKE_NAMES: Chevy, VW, Mercedes, ...), and some lines are named alone (ALONE: Veyron,
  Camaro). The body and the year are left to kind words and years, so they may stand anywhere.
- FGVCAircraft: a variant ``NNN-VVV`` (Boeing), ``ANNN-VVV`` (Airbus), ``BAE 146-VVV``,
  ``DHC-8-VVV``, ``CRJ-VVV`` belongs to the family named by its part before the last dash, with
  the maker's name in front (``Boeing 737``: eight variants). Other makers' names (MAKERS) and
  the curated AIRCRAFT names are added.
- OxfordIIITPet: each breed is a cat or a dog (CATS: the dataset's cat breeds). A breed's name
  followed by a word for another species is excluded (``Bengal tiger``, ``Boxer kitten``,
  ``Bombay duck``): the species word is read beside the name, not anywhere, because captions
  often name two animals (a boy with a rabbit and a pit bull).
- ImageNet-V2, -Sketch, -A and -R: ImageNet.yaml's ``exclude``, restricted to their classes.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
NAMES = HERE / "names"
HEADER = (
    "# Written by conf/datasets/_variants.py from the class names of {name}.yaml and its\n"
    "# curated tables; edit those and rerun it rather than this file.\n"
)

# ---------------------------------------------------------------------- StanfordCars

MAKES = [
    "AM General", "Aston Martin", "Land Rover", "Rolls-Royce", "Mercedes-Benz", "Acura", "Audi",
    "BMW", "Bentley", "Bugatti", "Buick", "Cadillac", "Chevrolet", "Chrysler", "Daewoo", "Dodge",
    "Eagle", "FIAT", "Ferrari", "Fisker", "Ford", "GMC", "Geo", "HUMMER", "Honda", "Hyundai",
    "Infiniti", "Isuzu", "Jaguar", "Jeep", "Lamborghini", "Lincoln", "MINI", "Maybach", "Mazda",
    "McLaren", "Mitsubishi", "Nissan", "Plymouth", "Porsche", "Ram", "Scion", "Spyker", "Suzuki",
    "Tesla", "Toyota", "Volkswagen", "Volvo", "smart",
]  # fmt: skip
# Other ways captions write a make (normalisation already equates case and punctuation).
MAKE_NAMES = {
    "Chevrolet": ["Chevy"],
    "Volkswagen": ["VW"],
    "Mercedes-Benz": ["Mercedes", "Benz", "Merc"],
    "Lamborghini": ["Lambo"],
    "Aston Martin": ["Aston"],
    "AM General": [],  # captions say Hummer H1 (MODEL_NAMES)
}
# Body types as class names end in them (longest first), and the kinds they are.
BODIES = [
    "Cargo Van", "Passenger Van", "Wagon Van", "Crew Cab", "Regular Cab", "Extended Cab",
    "Quad Cab", "Club Cab", "SuperCab", "Sedan", "Coupe", "Convertible", "Hatchback", "Wagon",
    "SUV", "Minivan", "Van",
]  # fmt: skip
CABS = ["Regular Cab", "Extended Cab", "Crew Cab", "Quad Cab", "Club Cab", "SuperCab"]
VANS = ["Van", "Cargo Van", "Passenger Van", "Wagon Van", "Minivan"]
# Caption words for body types -> the kinds (class bodies) they fit.
CAR_KIND_WORDS = {
    "sedan": ["Sedan"], "saloon": ["Sedan"],
    "coupe": ["Coupe"], "coupé": ["Coupe"], "fastback": ["Coupe", "Hatchback"],
    "convertible": ["Convertible"], "cabriolet": ["Convertible"], "cabrio": ["Convertible"],
    "roadster": ["Convertible"], "spyder": ["Convertible"], "spider": ["Convertible"],
    "drophead": ["Convertible"], "volante": ["Convertible"], "soft top": ["Convertible"],
    "hatchback": ["Hatchback"], "hatch": ["Hatchback"], "sportback": ["Hatchback"],
    "liftback": ["Hatchback"],
    "wagon": ["Wagon", "Wagon Van"], "estate": ["Wagon"], "avant": ["Wagon"],
    "sportwagen": ["Wagon"], "shooting brake": ["Wagon"],
    "suv": ["SUV"], "crossover": ["SUV", "Hatchback"], "cuv": ["SUV", "Hatchback"],
    "minivan": ["Minivan"], "mini van": ["Minivan"], "mpv": ["Minivan"],
    "van": VANS, "cargo van": ["Cargo Van"], "panel van": ["Cargo Van"],
    "passenger van": ["Passenger Van", "Wagon Van"],
    "pickup": CABS, "pick up": CABS, "pickup truck": CABS, "truck": CABS,
    "regular cab": ["Regular Cab"], "single cab": ["Regular Cab"], "standard cab": ["Regular Cab"],
    "extended cab": ["Extended Cab", "SuperCab", "Club Cab", "Quad Cab"],
    "ext cab": ["Extended Cab", "SuperCab", "Club Cab", "Quad Cab"],
    "double cab": ["Extended Cab", "Quad Cab"], "king cab": ["Extended Cab", "Club Cab"],
    "crew cab": ["Crew Cab"], "supercrew": ["Crew Cab"], "mega cab": ["Crew Cab"],
    "quad cab": ["Quad Cab"], "club cab": ["Club Cab"], "supercab": ["SuperCab"],
    "super cab": ["SuperCab"],
}  # fmt: skip
# class -> (line, trim, kinds) where the plain parse (line = the model, no trim, kind = body)
# is not what captions say.
LINES = {
    "Acura TL Type-S 2008": ("TL", "Type-S", ["Sedan"]),
    "Acura Integra Type R 2001": ("Integra", "Type R", ["Coupe", "Hatchback"]),
    "Audi TT RS Coupe 2012": ("TT", "RS", None),
    "BMW ActiveHybrid 5 Sedan 2012": ("ActiveHybrid 5", "", None),
    "Bentley Continental Supersports Conv. Convertible 2012": ("Continental", "Supersports", None),
    "Bentley Continental GT Coupe 2012": ("Continental", "GT", None),
    "Bentley Continental GT Coupe 2007": ("Continental", "GT", None),
    "Bentley Continental Flying Spur Sedan 2007": ("Continental", "Flying Spur", None),
    "Bugatti Veyron 16.4 Convertible 2009": ("Veyron", "16.4", None),
    "Bugatti Veyron 16.4 Coupe 2009": ("Veyron", "16.4", None),
    "Buick Regal GS 2012": ("Regal", "GS", ["Sedan"]),
    "Cadillac CTS-V Sedan 2012": ("CTS", "V", None),
    "Chevrolet Silverado 1500 Hybrid Crew Cab 2012": ("Silverado 1500", "Hybrid", None),
    "Chevrolet Silverado 1500 Classic Extended Cab 2007": ("Silverado 1500", "Classic", None),
    "Chevrolet Corvette ZR1 2012": ("Corvette", "ZR1", ["Coupe"]),
    "Chevrolet Corvette Ron Fellows Edition Z06 2007": ("Corvette", "Z06", ["Coupe"]),
    "Chevrolet HHR SS 2010": ("HHR", "SS", ["Wagon"]),
    "Chevrolet Tahoe Hybrid SUV 2012": ("Tahoe", "Hybrid", None),
    "Chevrolet Cobalt SS 2010": ("Cobalt", "SS", ["Coupe", "Sedan"]),
    "Chevrolet Malibu Hybrid Sedan 2010": ("Malibu", "Hybrid", None),
    "Chevrolet TrailBlazer SS 2009": ("TrailBlazer", "SS", ["SUV"]),
    "Chrysler 300 SRT-8 2010": ("300", "SRT-8", ["Sedan"]),
    "Dodge Ram Pickup 3500 Crew Cab 2010": ("Ram 3500", "", None),
    "Dodge Ram Pickup 3500 Quad Cab 2009": ("Ram 3500", "", None),
    "Dodge Challenger SRT8 2011": ("Challenger", "SRT8", ["Coupe"]),
    "Dodge Charger SRT-8 2009": ("Charger", "SRT-8", ["Sedan"]),
    "FIAT 500 Abarth 2012": ("500", "Abarth", ["Hatchback"]),
    "Ferrari 458 Italia Convertible 2012": ("458", "Italia", None),
    "Ferrari 458 Italia Coupe 2012": ("458", "Italia", None),
    "Ford F-450 Super Duty Crew Cab 2012": ("F-450", "Super Duty", None),
    "Ford Expedition EL SUV 2009": ("Expedition", "EL", None),
    "Ford E-Series Wagon Van 2012": ("E-Series", "", ["Wagon Van"]),
    "GMC Yukon Hybrid SUV 2012": ("Yukon", "Hybrid", None),
    "HUMMER H2 SUT Crew Cab 2009": ("H2", "SUT", None),
    "Hyundai Sonata Hybrid Sedan 2012": ("Sonata", "Hybrid", None),
    "Hyundai Elantra Touring Hatchback 2012": ("Elantra", "Touring", None),
    "Infiniti G Coupe IPL 2012": ("G37", "IPL", ["Coupe"]),
    "Jaguar XK XKR 2012": ("XK", "XKR", ["Coupe", "Convertible"]),
    "Lamborghini Gallardo LP 570-4 Superleggera 2012": ("Gallardo", "Superleggera", ["Coupe"]),
    "Ram C/V Cargo Van Minivan 2012": ("C/V", "", ["Minivan", "Cargo Van"]),
    "Rolls-Royce Phantom Drophead Coupe Convertible 2012": (
        "Phantom", "Drophead Coupe", ["Convertible", "Coupe"],
    ),
}  # fmt: skip
# More names of a line (after the make) or of a class (a full name, make included).
MODEL_NAMES = {
    ("Aston Martin", "V8 Vantage"): ["Vantage"],
    ("Chrysler", "Town and Country"): ["Town & Country"],
    ("Dodge", "Ram 3500"): ["Ram Pickup 3500"],
    ("Dodge", "Caravan"): ["Grand Caravan"],
    ("Ford", "E-Series"): ["Econoline", "E-150", "E-250", "E-350"],
    ("Land Rover", "LR2"): ["Freelander", "Freelander 2"],
    ("Lamborghini", "Gallardo Superleggera"): [
        "Gallardo LP 570-4",
        "Gallardo LP570-4 Superleggera",
    ],
    ("Mercedes-Benz", "300-Class"): ["300CE", "300 CE"],
    ("McLaren", "MP4-12C"): ["12C"],
    ("MINI", "Cooper Roadster"): ["Roadster"],
    ("Chevrolet", "Corvette Z06"): ["Corvette Ron Fellows"],
    ("Infiniti", "G37"): ["G Coupe", "G37 Coupe", "IPL G"],
    ("Rolls-Royce", "Phantom Drophead Coupe"): ["Phantom Drophead"],
    ("Bentley", "Continental Flying Spur"): ["Flying Spur"],
    ("FIAT", "500 Abarth"): ["Abarth 500"],
    ("Toyota", "4Runner"): ["4 Runner"],
    ("Mercedes-Benz", "C-Class"): ["C250", "C300", "C350", "C63 AMG"],
    ("Mercedes-Benz", "E-Class"): ["E350", "E550", "E63 AMG"],
    ("Mercedes-Benz", "S-Class"): ["S500", "S550", "S600", "S63 AMG", "S65 AMG"],
    ("Mercedes-Benz", "SL-Class"): ["SL500", "SL550", "SL63 AMG", "SL65 AMG"],
    ("BMW", "1 Series"): ["1-Series", "128i", "135i", "118d", "120d"],
    ("BMW", "3 Series"): [
        "3-Series",
        "318i",
        "320i",
        "325i",
        "328i",
        "330i",
        "335i",
        "320d",
        "330d",
    ],
    ("BMW", "6 Series"): ["6-Series", "645Ci", "650i"],
}
CLASS_NAMES = {
    "AM General Hummer SUV 2000": ["Hummer H1", "AM General Hummer"],
    "Plymouth Neon Coupe 1999": ["Dodge Neon Coupe"],
}
# Lines named alone in captions, which name little else.
ALONE = [
    "Veyron", "Camaro", "Corvette", "Silverado", "Silverado 1500", "Aventador", "Reventon",
    "Gallardo", "Panamera", "PT Cruiser", "4Runner", "Range Rover", "MP4-12C", "Elantra",
    "Veloster", "Kizashi", "Camry", "Corolla", "Grand Cherokee", "QX56", "XC90", "240SX", "HHR",
    "Azera", "Nubira", "fortwo", "F-150", "F-450", "Escalade EXT", "Corvette ZR1",
    "Corvette Z06", "Gallardo Superleggera", "Freelander",
]  # fmt: skip
# Families over several lines: name -> the lines (after the make) they hold.
PARENTS = {
    ("Chevrolet", "Silverado"): ["Silverado 1500", "Silverado 2500HD"],
    ("Dodge", "Ram"): ["Ram 3500"],
}
# Other models that contain a class's name; not the class.
CAR_EXCLUDE = {
    "Range Rover": ["Range Rover Sport", "Range Rover Evoque", "Range Rover Velar"],
    "Ford Mustang": ["Ford Mustang Mach E", "Ford Mustang Mach-E"],
    "Eagle Talon": ["bald eagle talon", "eagle talon necklace", "eagle talon claw"],
}


def parse_car(name: str) -> dict:
    """``{make, line, trim, kinds, year}`` of a StanfordCars class name."""
    make = next(m for m in MAKES if name.startswith(m + " "))
    words = name[len(make) + 1 :].split()
    year = int(words.pop())
    model, body = " ".join(words), None
    for b in BODIES:
        if model.endswith(" " + b):
            model, body = model[: -len(b) - 1], b
            break
    line, trim, kinds = LINES.get(name, (model, "", None))
    kinds = kinds or ([body] if body else [])
    if not kinds:
        raise SystemExit(f"no kind for {name!r}: add it to LINES")
    return {"make": make, "line": line, "trim": trim, "kinds": kinds, "year": year}


def cars(classes: list[str]) -> dict:

    parsed = {c: parse_car(c) for c in classes}
    names: dict[str, set[str]] = defaultdict(set)

    def add(models: list[str], make: str, cls: str | None) -> None:
        for model in models:
            for mk in [make, *MAKE_NAMES.get(make, [])]:
                names[f"{mk} {model}"].add(cls)
            if model in ALONE:
                names[model].add(cls)

    for c, p in parsed.items():
        line, trim, make = p["line"], p["trim"], p["make"]
        lines = [line, *MODEL_NAMES.get((make, line), [])]
        add(lines, make, c)
        if trim:
            full = f"{line} {trim}"
            add([full, *MODEL_NAMES.get((make, full), [])], make, c)
        names.update({n: names[n] | {c} for n in CLASS_NAMES.get(c, [])})
    for (make, parent), lines in PARENTS.items():
        members = {c for c, p in parsed.items() if p["make"] == make and p["line"] in lines}
        add([parent], make, None)
        for n in list(names):
            if None in names[n]:
                names[n] = (names[n] - {None}) | members
    variants, families = split_names(classes, names)
    check_kinds(classes, parsed)
    return {
        "variants": {c: variants[c] for c in classes if variants[c]},
        "families": families,
        "kind_words": CAR_KIND_WORDS,
        "class_kinds": {c: p["kinds"] for c, p in parsed.items()},
        "class_years": {c: p["year"] for c, p in parsed.items()},
        # A caption year this far from a class's year names another car of the same name (a
        # classic); the classes' years are model generations of 1991-2012.
        "max_year_gap": 15,
        "exclude": CAR_EXCLUDE,
    }


def split_names(
    classes: list[str], names: dict[str, set[str]]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Names of one class (variants) and of several (families); a name the caption matcher
    reads as a class name, or as a name already taken, is left out."""
    from pipeline.text_filter.terms import normalized

    taken = set(normalized(classes))
    variants: dict[str, list[str]] = defaultdict(list)
    families: dict[str, list[str]] = {}
    ordered_names = sorted(names, key=lambda n: (n.lower(), n))
    for n, toks in zip(ordered_names, normalized(ordered_names)):
        if toks in taken:
            continue
        taken.add(toks)
        ordered = [c for c in classes if c in names[n]]
        if len(ordered) == 1:
            variants[ordered[0]].append(n)
        else:
            families[n] = ordered
    return variants, families


def check_kinds(classes: list[str], parsed: dict) -> None:
    """A kind word inside a class's own name must fit the class (else its own full name would
    rule it out)."""
    from pipeline.text_filter.terms import normalized

    words = dict(zip(CAR_KIND_WORDS, normalized(list(CAR_KIND_WORDS))))
    for c, toks in zip(classes, normalized(classes)):
        for w, wt in words.items():
            n = len(wt)
            if any(toks[i : i + n] == wt for i in range(len(toks) - n + 1)):
                if not set(CAR_KIND_WORDS[w]) & set(parsed[c]["kinds"]):
                    raise SystemExit(f"{c!r} holds kind word {w!r} that does not fit its kinds")


# ---------------------------------------------------------------------- FGVCAircraft

# Prefix of a variant -> maker names written before it.
MAKERS = [
    (r"^7\d7\b|^Boeing", ["Boeing"]),
    (r"^A3\d\d", ["Airbus"]),
    (r"^ATR-", []),
    (r"^An-", ["Antonov"]),
    (r"^C-130", ["Lockheed"]),
    (r"^C-47|^DC-", ["Douglas", "McDonnell Douglas"]),
    (r"^CRJ-", ["Bombardier", "Canadair"]),
    (r"^Challenger", ["Bombardier", "Canadair"]),
    (r"^DH-", ["de Havilland"]),
    (r"^DHC-", ["de Havilland Canada", "de Havilland"]),
    (r"^DR-", ["Robin"]),
    (r"^E-1\d\d|^EMB-|^ERJ", ["Embraer"]),
    (r"^Falcon", ["Dassault"]),
    (r"^Global Express", ["Bombardier"]),
    (r"^Hawk", ["BAE", "BAe Systems"]),
    (r"^Il-", ["Ilyushin"]),
    (r"^L-1011", ["Lockheed"]),
    (r"^MD-", ["McDonnell Douglas", "Boeing"]),
    (r"^Metroliner", ["Fairchild", "Swearingen"]),
    (r"^Model B200", ["Beechcraft", "Beech"]),
    (r"^PA-", ["Piper"]),
    (r"^SR-", ["Cirrus"]),
    (r"^Spitfire", ["Supermarine"]),
    (r"^Tornado", ["Panavia"]),
    (r"^Tu-", ["Tupolev"]),
    (r"^Yak-", ["Yakovlev"]),
    (r"^F-16", ["General Dynamics", "Lockheed Martin"]),
    (r"^F/A-18", ["McDonnell Douglas", "Boeing"]),
]
# A variant's family: the name before its last "-NNN" (or Airbus's A300B4 -> A300).
FAMILY = re.compile(r"^(7\d7|A3\d\d|BAE 146|DHC-8|CRJ)-\w+$")
AIRCRAFT = {
    "707-320": ["Boeing 707", "B707"],
    "727-200": ["Boeing 727", "B727"],
    "A300B4": ["Airbus A300"],
    "Model B200": ["King Air", "King Air 200", "King Air B200", "Beechcraft B200"],
    "DH-82": ["Tiger Moth", "DH82 Tiger Moth"],
    "DHC-1": ["Chipmunk DHC-1", "de Havilland Chipmunk", "DHC-1 Chipmunk"],
    "DHC-6": ["Twin Otter", "DHC-6 Twin Otter"],
    "DHC-8-100": ["Dash 8-100", "Dash 8 Q100", "Q100"],
    "DHC-8-300": ["Dash 8-300", "Dash 8 Q300", "Q300"],
    "F-16A/B": ["F-16", "Fighting Falcon", "F-16 Fighting Falcon"],
    "F/A-18": ["F-18", "FA-18", "F/A-18 Hornet", "F-18 Hornet", "Super Hornet"],
    "L-1011": ["Lockheed TriStar", "L-1011 TriStar"],
    "E-170": ["Embraer 170", "Embraer E170", "ERJ-170"],
    "E-190": ["Embraer 190", "Embraer E190", "ERJ-190"],
    "E-195": ["Embraer 195", "Embraer E195", "ERJ-195"],
    "EMB-120": ["Embraer Brasilia", "EMB-120 Brasilia"],
    "CRJ-200": ["CRJ200"],
    "CRJ-700": ["CRJ700"],
    "CRJ-900": ["CRJ900"],
    "SR-20": ["SR20"],
    "C-130": ["C-130 Hercules", "Lockheed Hercules"],
    "C-47": ["C-47 Skytrain", "Douglas Dakota"],
    "Cessna 172": ["Cessna 172 Skyhawk", "Cessna Skyhawk"],
    "Cessna 208": ["Cessna Caravan", "Cessna Grand Caravan", "Cessna 208 Caravan"],
    "Cessna 525": ["Cessna CitationJet", "Citation CJ1", "Citation CJ2", "Citation CJ3"],
    "Cessna 560": ["Cessna Citation V", "Citation Ultra", "Citation Encore", "Cessna Citation 560"],
    "DC-9-30": ["DC-9", "Douglas DC-9"],
    "MD-80": ["MD-81", "MD-82", "MD-83", "MD-88"],
    "PA-28": ["Piper Cherokee", "Piper Warrior", "Piper Archer"],
    "Gulfstream IV": ["Gulfstream G-IV", "Gulfstream GIV"],
    "BAE 146-200": ["British Aerospace 146-200"],
    "BAE 146-300": ["British Aerospace 146-300"],
    "BAE-125": ["British Aerospace 125", "BAe 125", "Hawker 800"],
    "Gulfstream V": ["Gulfstream G-V", "Gulfstream GV"],
    "Dornier 328": ["Do 328", "Dornier Do 328"],
    "Beechcraft 1900": ["Beech 1900"],
    "Eurofighter Typhoon": ["Eurofighter", "Typhoon FGR4"],
    "Hawk T1": ["Hawk T1A", "BAE Hawk"],
    "Tornado": ["Tornado GR4", "Tornado GR1", "Tornado F3", "Tornado IDS"],
    "Embraer Legacy 600": ["Legacy 600"],
    "Challenger 600": ["Challenger 604", "Challenger 605"],
    "Fokker 100": ["Fokker F100"],
    "Fokker 70": ["Fokker F70"],
    "Fokker 50": ["Fokker F50"],
    "767-200": ["767-200ER", "Boeing 767-200ER"],
    "767-300": ["767-300ER", "Boeing 767-300ER"],
    "777-200": ["777-200ER", "777-200LR", "Boeing 777-200ER", "Boeing 777-200LR"],
    "777-300": ["777-300ER", "Boeing 777-300ER"],
}
FAMILY_NAMES = {
    "737": ["Boeing 737", "B737"],
    "747": ["Boeing 747", "B747", "Jumbo Jet 747"],
    "757": ["Boeing 757", "B757"],
    "767": ["Boeing 767", "B767"],
    "777": ["Boeing 777", "B777"],
    "A330": ["Airbus A330", "A330"],
    "A340": ["Airbus A340", "A340"],
    "BAE 146": ["BAE 146", "British Aerospace 146"],
    "DHC-8": ["DHC-8", "Dash 8", "Bombardier Dash 8", "de Havilland Canada Dash 8"],
    "CRJ": ["Bombardier CRJ", "Canadair Regional Jet", "Bombardier Regional Jet"],
}
AIRCRAFT_FAMILIES = {"Dassault Falcon": ["Falcon 2000", "Falcon 900"]}
# Variants the dataset lacks, named by a family's name and more.
AIRCRAFT_EXCLUDE = {
    "Boeing 737": ["Boeing 737 MAX"],
    "B737": ["B737 MAX"],
    "Boeing 747": ["Boeing 747-8"],
    "Dash 8": ["Dash 8 Q400", "Dash 8-400"],
    "DHC-8": ["DHC-8-400", "DHC-8 Q400"],
}


def aircraft(classes: list[str]) -> dict:

    names: dict[str, set[str]] = defaultdict(set)
    for c in classes:
        makers = next((m for p, m in MAKERS if re.search(p, c)), [])
        for mk in makers:
            if not c.startswith(mk):
                names[f"{mk} {c}"].add(c)
        for n in AIRCRAFT.get(c, []):
            names[n].add(c)
        if re.match(r"^7\d7-", c):  # airline and spotter shorthand: B737-800
            names[f"B{c}"].add(c)
        m = FAMILY.match(c)
        if m:
            fam = m.group(1)
            for n in FAMILY_NAMES.get(fam, [f"{makers[0]} {fam}" if makers else fam]):
                names[n].add(c)
    for n, members in AIRCRAFT_FAMILIES.items():
        names[n] |= set(members)
    variants, families = split_names(classes, names)
    return {
        "variants": {c: variants[c] for c in classes if variants[c]},
        "families": families,
        "exclude": AIRCRAFT_EXCLUDE,
    }


# ---------------------------------------------------------------------- OxfordIIITPet

CATS = [
    "Abyssinian", "Bengal", "Birman", "Bombay", "British Shorthair", "Egyptian Mau",
    "Maine Coon", "Persian", "Ragdoll", "Russian Blue", "Siamese", "Sphynx",
]  # fmt: skip
PET_WORDS = {
    "cat": ["cat"], "kitten": ["cat"], "kitty": ["cat"], "feline": ["cat"],
    "dog": ["dog"], "puppy": ["dog"], "pup": ["dog"], "doggy": ["dog"], "doggie": ["dog"],
    "canine": ["dog"], "hound": ["dog"], "pooch": ["dog"],
}  # fmt: skip
# Other animals: a breed name followed by one of these names something else (Bengal tiger,
# Bombay duck).
OTHER_ANIMALS = [
    "tiger", "lion", "leopard", "cheetah", "jaguar", "panther", "horse", "pony", "fish",
    "betta", "goldfish", "rabbit", "bunny", "bird", "parrot", "budgie", "hamster", "guinea pig",
    "ferret", "snake", "lizard", "turtle", "tortoise", "cow", "cattle", "goat", "sheep", "lamb",
    "pig", "chicken", "duck", "monkey", "deer", "elephant",
]  # fmt: skip
PET_NAMES = {
    "British Shorthair": ["British Blue cat"],
    "Newfoundland": ["Newfie dog"],
    "Wheaten Terrier": ["Soft Coated Wheaten Terrier", "Wheaten"],
    "Maine Coon": ["Mainecoon"],
    "Russian Blue": ["Russian Blue cat"],
}


def pets(classes: list[str], synonyms: dict[str, list[str]]) -> dict:
    missing = sorted(set(CATS) - set(classes))
    if missing:
        raise SystemExit(f"CATS lists breeds the dataset lacks: {missing}")
    exclude = {}
    for c in classes:
        species = "cat" if c in CATS else "dog"
        others = [w for w, k in PET_WORDS.items() if k != [species]] + OTHER_ANIMALS
        for name in [c, *synonyms.get(c, []), *PET_NAMES.get(c, [])]:
            if name.split()[-1].lower() not in PET_WORDS:  # "Scottie dog": its species said
                exclude[name] = [f"{name} {w}" for w in others]
    return {"variants": {c: PET_NAMES[c] for c in classes if c in PET_NAMES}, "exclude": exclude}


# ---------------------------------------------------------------------- writing


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # each list written out, never "&id001"
        return True


def _dump(data) -> str:
    """Block mappings, flow lists, one entry a line."""
    return yaml.dump(
        data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=10_000,
        default_flow_style=None,
    )  # fmt: skip


def write_names(dataset: str, names: dict) -> None:
    """Write ``names/<dataset>.yaml`` and check that the dataset loads with it."""
    NAMES.mkdir(exist_ok=True)
    text = HEADER.format(name=dataset) + _dump(names)
    assert yaml.safe_load(text) == names, dataset
    (NAMES / f"{dataset}.yaml").write_text(text, encoding="utf-8")


def set_section(dataset: str, key: str, value) -> None:
    """Replace (or append) the top-level ``key`` of a dataset YAML, leaving the rest as it is."""
    path = HERE / f"{dataset}.yaml"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    out, skip = [], False
    for ln in lines:
        if re.match(rf"^{re.escape(key)}:", ln):
            skip = True
            continue
        if skip and (ln.startswith((" ", "-")) or not ln.strip()):
            continue
        skip = False
        out.append(ln)
    if isinstance(value, dict) and value:
        body = _dump(value)
        out.append(f"{key}:\n" + "".join("  " + ln for ln in body.splitlines(keepends=True)))
    elif value:
        out.append(yaml.safe_dump({key: value}, default_flow_style=False, allow_unicode=True))
    path.write_text("".join(out), encoding="utf-8")


def main() -> None:
    sys.path.insert(0, str(HERE.parents[1]))
    load = lambda d: yaml.safe_load((HERE / f"{d}.yaml").read_text(encoding="utf-8"))  # noqa: E731
    write_names("StanfordCars", cars(load("StanfordCars")["classes"]))
    write_names("FGVCAircraft", aircraft(load("FGVCAircraft")["classes"]))
    pet = load("OxfordIIITPet")
    write_names("OxfordIIITPet", pets(pet["classes"], pet.get("synonyms") or {}))
    for d in ("StanfordCars", "FGVCAircraft", "OxfordIIITPet"):
        set_section(d, "names", f"names/{d}.yaml")
        set_section(d, "exclude", load(d).get("exclude"))  # kept last, after names
    from pipeline.core.config import load_dataset
    from pipeline.text_filter.terms import normalized

    imagenet = load_dataset("ImageNet", descriptions=False)
    for d in ("ImageNet-V2", "ImageNet-Sketch", "ImageNet-A", "ImageNet-R"):
        spec = load_dataset(d, descriptions=False)
        own = set(normalized(list(spec.classes) + [s for v in spec.synonyms.values() for s in v]))
        keep = {k: list(v) for k, v in imagenet.exclude.items() if normalized([k])[0] in own}
        set_section(d, "exclude", keep)
    for d in ("StanfordCars", "FGVCAircraft", "OxfordIIITPet", "ImageNet-A", "ImageNet-R"):
        load_dataset(d, descriptions=False)  # raises on anything the loader refuses


if __name__ == "__main__":
    main()
