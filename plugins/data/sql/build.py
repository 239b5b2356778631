"""Build the SQL task's databases and questions (deterministic: a fixed seed).

Run from the repository root::

    .venv/bin/python plugins/data/sql/build.py [OUT_DIR]

It rewrites ``<db>.sqlite`` (in ``OUT_DIR``, by default this folder) for six small, invented databases and
``questions.jsonl`` with ``{db, split, question, gold_sql}`` rows. Four databases
are for training prompts and two, with other schemas, are held out for evaluation. Each question
comes from a template over the schema; a question is kept only when its gold query runs, returns
rows, and (for "the highest/lowest" and "ordered by" questions) its answer is unambiguous.
"""

from __future__ import annotations

import json
import random
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261125
ROUNDS = 3  # passes over the templates, each drawing new values; repeated questions are kept once

FIRST = ("Ada Alan Beatriz Carlos Chen Dana Elif Emma Farah Felix Grace Hana Ivan Jonas Kofi Lena Luca "
         "Maya Mateo Nadia Noah Olga Omar Priya Quinn Rosa Sami Sofia Tariq Uma Viktor Wen Yara Zoe").split()
LAST = ("Abbott Bauer Castro Dubois Eriksen Fischer Garcia Haddad Ito Jansen Kowalski Lopez Moreau Nakamura "
        "Okafor Petrov Quinn Rossi Silva Tanaka Umar Varga Weber Xu Yilmaz Zhang").split()
CITIES = ["Lisbon", "Oslo", "Nairobi", "Osaka", "Lima", "Krakow", "Austin", "Porto", "Seoul", "Dublin"]
COUNTRIES = ["Portugal", "Norway", "Kenya", "Japan", "Peru", "Poland", "Canada", "Ireland"]
WORDS = ("Silent River Glass Garden Winter Orchard Copper Moon Hidden Harbor Last Lantern Paper Crown "
         "Iron Meadow Salt Tide Northern Star Velvet Storm Amber Road Quiet Forest").split()


@dataclass
class Col:
    name: str
    kind: str  # "label" (a distinct name), "cat" (a category), "int", "real", "fk" (a parent table)
    values: tuple = ()  # categories, or (low, high) for numbers, or the parent table for "fk"
    phrase: str = ""  # how a question says it; the column name with spaces by default

    @property
    def words(self) -> str:
        return self.phrase or self.name.replace("_", " ")


@dataclass
class Table:
    name: str
    singular: str
    rows: int
    cols: list[Col] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.singular.replace(' ', '_')}_id"

    def col(self, kind: str) -> list[Col]:
        return [c for c in self.cols if c.kind == kind]


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def title(rng: random.Random) -> str:
    return f"The {rng.choice(WORDS)} {rng.choice(WORDS)}"


LABEL_MAKERS = {"person": person, "title": title}


def _db(split: str, *tables: Table, label_kinds: dict[str, str]) -> dict:
    return {"split": split, "tables": list(tables), "label_kinds": label_kinds}


DATABASES = {
    "library": _db(
        "train",
        Table("authors", "author", 30, [Col("name", "label"), Col("country", "cat", tuple(COUNTRIES)),
                                        Col("birth_year", "int", (1920, 1995), "birth year")]),
        Table("books", "book", 120, [Col("title", "label"), Col("author_id", "fk", ("authors",)),
                                     Col("genre", "cat", ("mystery", "poetry", "history", "science", "fantasy")),
                                     Col("pages", "int", (60, 900), "number of pages"),
                                     Col("price", "real", (4.0, 60.0))]),
        label_kinds={"authors": "person", "books": "title"}),
    "retail": _db(
        "train",
        Table("customers", "customer", 60, [Col("name", "label"), Col("city", "cat", tuple(CITIES)),
                                            Col("age", "int", (18, 85))]),
        Table("orders", "order", 200, [Col("reference", "label", (), "order reference"),
                                       Col("customer_id", "fk", ("customers",)),
                                       Col("channel", "cat", ("web", "store", "phone")),
                                       Col("quantity", "int", (1, 40)), Col("total", "real", (3.0, 900.0),
                                                                            "order total")]),
        label_kinds={"customers": "person", "orders": "reference"}),
    "school": _db(
        "train",
        Table("teachers", "teacher", 25, [Col("name", "label"),
                                          Col("subject", "cat", ("math", "biology", "art", "music", "physics")),
                                          Col("salary", "int", (28000, 90000)),
                                          Col("hire_year", "int", (1990, 2024), "hiring year")]),
        Table("students", "student", 150, [Col("name", "label"), Col("teacher_id", "fk", ("teachers",)),
                                           Col("grade_level", "cat", ("7", "8", "9", "10"), "grade level"),
                                           Col("gpa", "real", (1.0, 4.0), "GPA")]),
        label_kinds={"teachers": "person", "students": "person"}),
    "clinic": _db(
        "train",
        Table("doctors", "doctor", 20, [Col("name", "label"),
                                        Col("specialty", "cat", ("cardiology", "pediatrics", "dermatology",
                                                                 "neurology")),
                                        Col("years_experience", "int", (1, 40), "years of experience")]),
        Table("patients", "patient", 140, [Col("name", "label"), Col("doctor_id", "fk", ("doctors",)),
                                           Col("city", "cat", tuple(CITIES)), Col("age", "int", (1, 99)),
                                           Col("weight_kg", "real", (3.0, 140.0), "weight in kg")]),
        label_kinds={"doctors": "person", "patients": "person"}),
    "airline": _db(
        "eval",
        Table("airports", "airport", 24, [Col("code", "label", (), "airport code"),
                                          Col("country", "cat", tuple(COUNTRIES)),
                                          Col("runways", "int", (1, 6), "number of runways")]),
        Table("flights", "flight", 160, [Col("flight_number", "label", (), "flight number"),
                                         Col("airport_id", "fk", ("airports",)),
                                         Col("carrier", "cat", ("SkyLark", "Aurora Air", "Polar Jet", "Condor Blue")),
                                         Col("distance_km", "int", (150, 12000), "distance in km"),
                                         Col("fare", "real", (39.0, 1900.0))]),
        label_kinds={"airports": "code", "flights": "flight"}),
    "football": _db(
        "eval",
        Table("clubs", "club", 16, [Col("name", "label"), Col("city", "cat", tuple(CITIES)),
                                    Col("founded", "int", (1870, 2010), "founding year")]),
        Table("players", "player", 180, [Col("name", "label"), Col("club_id", "fk", ("clubs",)),
                                         Col("position", "cat", ("goalkeeper", "defender", "midfielder", "forward")),
                                         Col("goals", "int", (0, 60)), Col("market_value", "real", (0.2, 95.0),
                                                                          "market value in millions")]),
        label_kinds={"clubs": "club", "players": "person"}),
}

CLUB_WORDS = ("Rovers United Athletic Wanderers Rangers City Albion Harriers").split()


def _label(kind: str, rng: random.Random, i: int) -> str:
    if kind in LABEL_MAKERS:
        return LABEL_MAKERS[kind](rng)
    if kind == "reference":
        return f"ORD-{10000 + i * 7}"
    if kind == "code":
        return "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(3))
    if kind == "flight":
        return f"{rng.choice(['SL', 'AU', 'PJ', 'CB'])}{rng.randint(100, 9999)}"
    if kind == "club":
        return f"{rng.choice(CITIES)} {rng.choice(CLUB_WORDS)}"
    raise ValueError(f"unknown label kind {kind!r}")


def build_db(name: str, spec: dict, rng: random.Random, out_dir: Path) -> Path:
    path = out_dir / f"{name}.sqlite"
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    counts: dict[str, int] = {}
    for t in spec["tables"]:
        ddl = [f"{t.key} INTEGER PRIMARY KEY"]
        for c in t.cols:
            typ = {"label": "TEXT", "cat": "TEXT", "int": "INTEGER", "real": "REAL", "fk": "INTEGER"}[c.kind]
            ref = f" REFERENCES {c.values[0]}" if c.kind == "fk" else ""
            ddl.append(f"{c.name} {typ}{ref}")
        conn.execute(f"CREATE TABLE {t.name} (\n  " + ",\n  ".join(ddl) + "\n)")
        labels: set[str] = set()
        rows = []
        for i in range(1, t.rows + 1):
            row: list = [i]
            for c in t.cols:
                if c.kind == "label":
                    v = _label(spec["label_kinds"][t.name], rng, i)
                    while v in labels:
                        v = _label(spec["label_kinds"][t.name], rng, i)
                    labels.add(v)
                elif c.kind == "cat":
                    v = rng.choice(c.values)
                elif c.kind == "int":
                    v = rng.randint(*c.values)
                elif c.kind == "real":
                    v = round(rng.uniform(*c.values), 2)
                else:
                    v = rng.randint(1, counts[c.values[0]])
                row.append(v)
            rows.append(row)
        conn.executemany(f"INSERT INTO {t.name} VALUES ({', '.join('?' * (len(t.cols) + 1))})", rows)
        counts[t.name] = t.rows
    conn.commit()
    conn.execute("VACUUM")
    conn.close()
    return path


def _plural(t: Table) -> str:
    return t.name.replace("_", " ")


def questions_for(spec: dict, conn: sqlite3.Connection, rng: random.Random) -> list[tuple[str, str, str]]:
    """``(question, gold_sql, check)`` candidates; ``check`` says how to validate the answer."""
    out = []
    tables = {t.name: t for t in spec["tables"]}
    for t in spec["tables"]:
        label = t.col("label")[0]
        plural = _plural(t)
        out.append((f"How many {plural} are there?", f"SELECT count(*) FROM {t.name}", "rows"))
        for c in t.col("cat"):
            v = rng.choice(c.values)
            out.append((f"List the {label.words} of every {t.singular} whose {c.words} is '{v}'.",
                        f"SELECT {label.name} FROM {t.name} WHERE {c.name} = '{v}'", "rows"))
            out.append((f"How many {plural} have {c.words} '{v}'?",
                        f"SELECT count(*) FROM {t.name} WHERE {c.name} = '{v}'", "rows"))
            out.append((f"For each {c.words}, how many {plural} are there?",
                        f"SELECT {c.name}, count(*) FROM {t.name} GROUP BY {c.name}", "rows"))
            out.append((f"Which {c.words} has the most {plural}?",
                        f"SELECT {c.name} FROM {t.name} GROUP BY {c.name} ORDER BY count(*) DESC LIMIT 1",
                        "unique_top_count"))
        for c in t.col("int") + t.col("real"):
            lo, hi = c.values
            cut = round(lo + (hi - lo) * rng.uniform(0.3, 0.7), 0 if c.kind == "int" else 1)
            cut_s = f"{int(cut)}" if c.kind == "int" else f"{cut:g}"
            out.append((f"What is the average {c.words} of all {plural}?", f"SELECT avg({c.name}) FROM {t.name}", "rows"))
            fn, word = rng.choice([("max", "highest"), ("min", "lowest")])
            out.append((f"What is the {word} {c.words} among {plural}?", f"SELECT {fn}({c.name}) FROM {t.name}", "rows"))
            out.append((f"How many {plural} have {c.words} greater than {cut_s}?",
                        f"SELECT count(*) FROM {t.name} WHERE {c.name} > {cut_s}", "rows"))
            order = "DESC" if fn == "max" else "ASC"
            out.append((f"What is the {label.words} of the {t.singular} with the {word} {c.words}?",
                        f"SELECT {label.name} FROM {t.name} ORDER BY {c.name} {order} LIMIT 1", f"unique:{c.name}"))
            out.append((f"List the {label.words} and {c.words} of the three {plural} with the {word} {c.words}, "
                        f"{word} first.",
                        f"SELECT {label.name}, {c.name} FROM {t.name} ORDER BY {c.name} {order} LIMIT 3",
                        f"unique3:{c.name}"))
        for fk in t.col("fk"):
            parent = tables[fk.values[0]]
            plabel = parent.col("label")[0]
            pv = rng.choice([r[0] for r in conn.execute(f"SELECT {plabel.name} FROM {parent.name} ORDER BY 1")])
            out.append((f"List the {label.words} of the {plural} of the {parent.singular} whose {plabel.words} "
                        f"is '{pv}'.",
                        f"SELECT T1.{label.name} FROM {t.name} AS T1 JOIN {parent.name} AS T2 ON T1.{fk.name} = "
                        f"T2.{parent.key} WHERE T2.{plabel.name} = '{pv}'", "rows"))
            out.append((f"Show the {plabel.words} of each {parent.singular} and how many {plural} it has.",
                        f"SELECT T2.{plabel.name}, count(*) FROM {t.name} AS T1 JOIN {parent.name} AS T2 ON "
                        f"T1.{fk.name} = T2.{parent.key} GROUP BY T2.{parent.key}", "rows"))
            for c in parent.col("cat")[:1]:
                v = rng.choice(c.values)
                out.append((f"How many {plural} belong to {parent.name.replace('_', ' ')} whose {c.words} is '{v}'?",
                            f"SELECT count(*) FROM {t.name} AS T1 JOIN {parent.name} AS T2 ON T1.{fk.name} = "
                            f"T2.{parent.key} WHERE T2.{c.name} = '{v}'", "rows"))
    return out


def _valid(conn: sqlite3.Connection, sql: str, check: str) -> bool:
    rows = conn.execute(sql).fetchall()
    if not rows or rows == [(0,)] or rows == [(None,)]:
        return False
    base = sql.split(" ORDER BY ")[0].split(" FROM ")[1]
    if check.startswith(("unique:", "unique3:")):
        col = check.split(":")[1]
        k = 3 if check.startswith("unique3") else 1
        direction = "DESC" if "DESC LIMIT" in sql else "ASC"
        tops = [r[0] for r in conn.execute(f"SELECT {col} FROM {base} ORDER BY {col} {direction} LIMIT {k + 1}")]
        return len(set(tops)) == len(tops)
    if check == "unique_top_count":
        grouped = base.split(" GROUP BY ")
        counts = [r[0] for r in conn.execute(f"SELECT count(*) AS n FROM {grouped[0]} GROUP BY {grouped[1]} "
                                             f"ORDER BY n DESC LIMIT 2")]
        return len(counts) < 2 or counts[0] != counts[1]
    return True


def main(out_dir: Path = HERE) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    records = []
    for name, spec in DATABASES.items():
        path = build_db(name, spec, rng, out_dir)
        conn = sqlite3.connect(path)
        kept: dict[str, str] = {}
        for _ in range(ROUNDS):
            for q, s, check in questions_for(spec, conn, rng):
                if q not in kept and _valid(conn, s, check):
                    kept[q] = s
        conn.close()
        records += [{"db": name, "split": spec["split"], "question": q, "gold_sql": s} for q, s in kept.items()]
        print(f"{name}: {spec['split']}, {len(kept)} questions, {path.stat().st_size} bytes")
    with open(out_dir / "questions.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
