"""The robustness report: a table, JSON, and a self-contained HTML page (images, table, ASR bar chart)."""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from ._core import AttackResult, Case, Generation

REPORT_FILE = "report.json"
PAGE_FILE = "index.html"


def _percent(value) -> str:
    return "–" if value is None else f"{value:.0%}"


@dataclass
class Report:
    concept: str
    detector: str
    threshold: float
    budget: str
    generation: Generation
    results: dict = field(default_factory=dict)  # attack name -> AttackResult

    def table(self) -> str:
        """Markdown: ASR per attack beside the no-attack and base-model rates, with its cost."""
        lines = [f"Concept {self.concept!r}, detector {self.detector} (≥ {self.threshold:g}), budget {self.budget}.",
                 "", "| attack | ASR | no attack | base model | queries | UNet evals | seconds |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.results.values():
            lines.append(f"| {r.attack} | {_percent(r.asr)} | {_percent(r.no_attack_rate)} | "
                         f"{_percent(r.base_rate)} | {r.queries} | {r.unet_evaluations} | {r.seconds:.1f} |")
        for r in self.results.values():
            curve = r.curve()
            if curve:
                points = ", ".join(f"{_percent(v)} after {k}" for k, v in curve.items())
                lines += ["", f"{r.attack} recovery curve (ASR after each number of steps): {points}."]
            baseline = r.baseline_curve()
            if baseline:
                points = ", ".join(f"{_percent(v)} after {k}" for k, v in baseline.items())
                lines += ["", f"{r.attack} baseline (the unerased model learning the new word "
                              f"{r.options.get('fresh_word')!r} for the same images): {points}."]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"concept": self.concept, "detector": self.detector, "threshold": self.threshold,
                "budget": self.budget, "generation": asdict(self.generation),
                "results": {name: r.to_dict() for name, r in self.results.items()}}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        results = {}
        for name, r in data["results"].items():
            cases = [Case(**{**c, **{k: {int(step): v for step, v in c[k].items()}  # JSON keys are strings
                                     for k in ("curve", "baseline_curve") if c.get(k)}}) for c in r["cases"]]
            results[name] = AttackResult(r["attack"], r["budget"], r["options"], cases, data["threshold"],
                                         seconds=r["seconds"], unet_evaluations=r["unet_evaluations"])
        return cls(data["concept"], data["detector"], data["threshold"], data["budget"],
                   Generation(**data["generation"]), results)

    @classmethod
    def load(cls, directory) -> Report:
        """A report saved by `save` (without its images)."""
        path = Path(directory) / REPORT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; pass the folder `Report.save` wrote.")
        return cls.from_dict(json.loads(path.read_text()))

    def save(self, directory) -> Path:
        """Write report.json, the attacks' images (images/*.png) and index.html into `directory`; returns it."""
        directory = Path(directory)
        (directory / "images").mkdir(parents=True, exist_ok=True)
        (directory / REPORT_FILE).write_text(self.to_json())
        pictures = {}
        for name, result in self.results.items():
            for index, image in result.images.items():
                file = f"images/{name}_{index}.png"
                Image.fromarray(image).save(directory / file)
                pictures[(name, index)] = file
        (directory / PAGE_FILE).write_text(self._page(pictures))
        return directory

    def _page(self, pictures: dict) -> str:
        rows = "".join(
            f"<tr><td>{html.escape(r.attack)}</td><td>{_percent(r.asr)}</td><td>{_percent(r.no_attack_rate)}</td>"
            f"<td>{_percent(r.base_rate)}</td><td>{r.queries}</td><td>{r.unet_evaluations}</td>"
            f"<td>{r.seconds:.1f}</td></tr>" for r in self.results.values())
        cases = "".join(self._cases(name, r, pictures) for name, r in self.results.items())
        title = html.escape(f"Robustness of the erasure of {self.concept!r}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
                "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
                "td,th{border:1px solid #999;padding:4px 8px}img{width:96px;image-rendering:pixelated}</style>"
                f"</head><body><h1>{title}</h1><p>Detector {html.escape(self.detector)} (score ≥ "
                f"{self.threshold:g}), budget {html.escape(self.budget)}, "
                f"{html.escape(json.dumps(asdict(self.generation)))}.</p>"
                f"<h2>Attack success rate</h2>{self._chart()}"
                "<table id='summary'><tr><th>attack</th><th>ASR</th><th>no attack</th><th>base model</th>"
                f"<th>queries</th><th>UNet evals</th><th>seconds</th></tr>{rows}</table>{cases}</body></html>")

    def _chart(self) -> str:
        """An SVG bar chart: per attack, bars for ASR, the no-attack rate and the base rate."""
        bars, width, height = [], 60, 200
        colours = {"ASR": "#c0392b", "no attack": "#7f8c8d", "base": "#2980b9"}
        for i, r in enumerate(self.results.values()):
            x = 40 + i * (3 * width + 40)
            for j, (label, value) in enumerate((("ASR", r.asr), ("no attack", r.no_attack_rate),
                                                ("base", r.base_rate))):
                h = 0 if value is None else value * height
                bars.append(f"<rect class='bar' x='{x + j * width}' y='{20 + height - h:.1f}' width='{width - 6}' "
                            f"height='{h:.1f}' fill='{colours[label]}'><title>{label}: {_percent(value)}"
                            "</title></rect>")
                bars.append(f"<text x='{x + j * width}' y='{16 + height - h:.1f}' font-size='11'>"
                            f"{_percent(value)}</text>")
            bars.append(f"<text x='{x}' y='{height + 40}'>{html.escape(r.attack)}</text>")
        legend = "".join(f"<text x='{40 + k * 110}' y='14' fill='{c}'>{label}</text>"
                         for k, (label, c) in enumerate(colours.items()))
        total = 80 + len(self.results) * (3 * width + 40)
        return (f"<svg id='asr-chart' xmlns='http://www.w3.org/2000/svg' width='{total}' height='{height + 60}'>"
                f"{legend}{''.join(bars)}</svg>")

    @staticmethod
    def _cases(name: str, result: AttackResult, pictures: dict) -> str:
        rows = []
        for index, c in enumerate(result.cases):
            picture = pictures.get((name, index))
            image = f"<img src='{picture}' alt='{html.escape(name)} case {index}'>" if picture else ""
            rows.append(f"<tr><td>{html.escape(c.prompt)}</td><td>{c.seed}</td><td>{c.no_attack:.2f}</td>"
                        f"<td>{'' if c.attacked is None else f'{c.attacked:.2f}'}</td>"
                        f"<td>{html.escape(c.adversarial or '')}</td><td>{'yes' if c.success else 'no'}</td>"
                        f"<td>{image}</td></tr>")
        return (f"<h2>{html.escape(name)}</h2><table><tr><th>prompt</th><th>seed</th><th>no-attack score</th>"
                "<th>attacked score</th><th>found</th><th>success</th><th>image</th></tr>" + "".join(rows) +
                "</table>")
