"""Item descriptions and user profiles: the text the LLM and the semantic encoder read.

Item descriptions follow ReLLa (arXiv 2308.11131), the sentence RecLoRA embeds for semantic
retrieval: "Here is a movie. Its title is {title}. The movie's genre is {genres}."
User profiles follow the RecLoRA/ReLLa ML-1M prompt: "The user is a male. His job is
technician. His age is 24." Pure ID fields (user id, zip code) stay out of the text.
"""

from __future__ import annotations

# ML-1M users.dat codes (README of ml-1m).
ML1M_AGE = {"1": "under 18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49",
            "50": "50-55", "56": "56+"}
ML1M_OCCUPATION = {
    "0": "other", "1": "academic/educator", "2": "artist", "3": "clerical/admin",
    "4": "college/grad student", "5": "customer service", "6": "doctor/health care",
    "7": "executive/managerial", "8": "farmer", "9": "homemaker", "10": "K-12 student",
    "11": "lawyer", "12": "programmer", "13": "retired", "14": "sales/marketing",
    "15": "scientist", "16": "self-employed", "17": "technician/engineer",
    "18": "tradesman/craftsman", "19": "unemployed", "20": "writer",
}
GENDER = {"M": "male", "F": "female"}


def age_group(age: int) -> str:
    """ML-1M's age bucket code for an age in years (used to give ML-100K the same feature)."""
    for lo, code in ((56, "56"), (50, "50"), (45, "45"), (35, "35"), (25, "25"), (18, "18")):
        if age >= lo:
            return code
    return "1"


def item_description(kind: str, title: str, genres: str, meta: dict | None = None) -> str:
    """The ReLLa item sentence; the genre sentence is left out when the item has none."""
    if kind not in ("movie", "book"):
        raise ValueError(f"kind must be 'movie' or 'book', got {kind!r}")
    text = f"Here is a {kind}. Its title is {title}."
    authors = (meta or {}).get("authors_text")
    if authors:
        text += f" Its author is {authors}."
    if genres:
        text += f" The {kind}'s genre is {genres}."
    return text


def pronouns(gender: str) -> tuple[str, str]:
    """(nominative, possessive) for "male"/"female"; "the user" / "The user's" otherwise."""
    g = GENDER.get(gender, gender)
    if g == "female":
        return "she", "her"
    if g == "male":
        return "he", "his"
    return "the user", "the user's"


def user_profile(source: str, attrs: dict[str, str]) -> str | None:
    """A profile sentence from demographic fields, or None if there are none.

    ``attrs`` holds text: gender ("M"/"F" or "male"/"female"), age (years or an ML-1M
    code), occupation (text or an ML-1M code).
    """
    gender = GENDER.get(attrs.get("gender", ""), attrs.get("gender", ""))
    age = attrs.get("age", "")
    job = attrs.get("occupation", "")
    if source == "ml-1m":
        age = ML1M_AGE.get(age, age)
        job = ML1M_OCCUPATION.get(job, job)
    if not (gender or age or job):
        return None
    _, poss = pronouns(gender)
    parts = [f"The user is a {gender}." if gender else "The user's gender is unknown."]
    if job:
        parts.append(f"{poss.capitalize()} job is {job}.")
    if age:
        parts.append(f"{poss.capitalize()} age is {age}.")
    return " ".join(parts)
