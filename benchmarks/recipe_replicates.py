"""Several trainings of each recipe on the same problems: how far apart text SFT and LaDiR are, next to how much one
training moves a recipe's scores.

    Q=benchmarks/ladir_quality.py
    python $Q --seed 5 --output_dir S5                                                # both recipes, training seed 5
    python $Q --seed 5 --training_seed 105 --recipes text_sft --output_dir T105       # text SFT trained again
    python $Q --seed 5 --training_seed 105 --recipes ladir --no-diagnostics \\
        --text_sft_results S5/ladir_quality.json --output_dir L105                    # LaDiR trained again
    python benchmarks/recipe_replicates.py S5/ladir_quality.json T105/ladir_quality.json L105/ladir_quality.json

(each `ladir_quality.py` line with the same recipe flags). It collects every training of each recipe in the given
`ladir_quality.py` reports: a text SFT part that a report reused with `--text_sft_results` is not a training of that
report and is skipped (list the report that trained it). Reports on other problems, sampled otherwise or trained with
other settings are refused, but for the settings named with `--not_compared` (e.g. `budget_seconds` for a training
given more time on a slower CPU so that it took about as many steps; each training's steps are listed where its
report recorded them).
`--text_sft_only REPORT ...` adds reports whose text SFT part only is pooled, e.g. a side-by-side report whose LaDiR
part trained another LaDiR recipe (its LaDiR flags are not compared). For each recipe: every training's pass@k, their
mean and standard deviation. Then LaDiR minus text SFT, in points:

- `between_trainings`: the difference of the two means, with the standard error that the trainings' spread gives,
  sqrt(sd_ladir^2 / n_ladir + sd_text^2 / n_text): how sure the difference is on these problems;
- `over_problems`: the same difference as a mean over problems of each recipe's per-problem pass@k averaged over its
  trainings, with its standard error over problems: how sure it is for other problems of the same generator.

Writes `--output` (JSON) and prints the table.
"""

import argparse
import json
import math
import os
import statistics
from statistics import fmean as mean

from ladir_quality import add_ladir_recipe_arguments  # benchmarks/ladir_quality.py

from trl_ladi.evaluation import pass_at_k

# settings that do not change what a recipe trains or how its answers are sampled
NOT_COMPARED = {"output_dir", "training_seed", "recipes", "text_sft_results", "diagnostics", "block_breakdown",
                "also_sde_noise_levels", "also_draw_slots_from_prior"}
# settings added after some reports were written, with the value those reports trained with
LEGACY_SETTINGS = {"stop_readout": "head"}


def ladir_only_settings() -> set:
    """The LaDiR recipe's flags that text SFT does not read (not compared for a report used for its text SFT only)."""
    parser = argparse.ArgumentParser()
    add_ladir_recipe_arguments(parser)
    shared = {"max_steps_per_stage", "decay_learning_rate"}  # text SFT reads these too
    return set(vars(parser.parse_args([]))) - shared


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="ladir_quality.py JSON reports on the same problems.")
    parser.add_argument("--text_sft_only", nargs="+", default=[],
                        help="More reports on the same problems whose text SFT part only is pooled (their LaDiR part "
                             "trained another LaDiR recipe).")
    parser.add_argument("--not_compared", nargs="+", default=[],
                        help="More settings the reports may differ in, e.g. budget_seconds for a training given a "
                             "longer budget on a slower CPU so that it took about as many steps as the others (each "
                             "training's steps are listed where recorded). The output records them.")
    parser.add_argument("--output", default="recipe_replicates.json")
    return parser.parse_args()


def check_same_settings(reports, text_sft_only=frozenset(), not_compared=frozenset()):
    """Refuses reports whose problems, sampling or recipes differ (a setting missing from an older report is not
    compared, but for LEGACY_SETTINGS; nor are those in `not_compared`); a report with no LaDiR part pooled (none, or
    in `text_sft_only`) is not compared on the LaDiR recipe's flags."""
    ladir_only = ladir_only_settings()

    def pools_ladir(name, report):
        return "ladir" in report and name not in text_sft_only

    # the reference: a report whose every setting counts (the others are compared with it)
    first_name, first = next(((name, r) for name, r in reports if pools_ladir(name, r)), reports[0])
    first_settings = {**LEGACY_SETTINGS, **first["settings"]}
    for name, report in reports:
        ignored = NOT_COMPARED | set(not_compared) | (set() if pools_ladir(name, report) else ladir_only)
        its_settings = {**LEGACY_SETTINGS, **report["settings"]}
        for key in sorted(first_settings.keys() & its_settings.keys() - ignored):
            if first_settings[key] != its_settings[key]:
                raise ValueError(
                    f"{name} has {key}={its_settings[key]!r} where {first_name} has {first_settings[key]!r}: "
                    "the reports must score the same problems, sampled the same way, with the same recipes."
                )


def collect_trainings(reports, recipe, text_sft_only=frozenset()):
    """Each training of `recipe` ("text_sft" or "ladir") in the reports, with its training seed and per-problem counts
    (none of "ladir" from a report in `text_sft_only`)."""
    trainings = []
    for name, report in reports:
        settings = report["settings"]
        if recipe not in report or (recipe == "text_sft" and settings.get("text_sft_results")):
            continue
        if recipe == "ladir" and name in text_sft_only:
            continue
        training_seed = settings.get("training_seed", settings["seed"])
        if "training_seed" not in settings and recipe == "ladir" and not settings.get("text_sft_results"):
            # reports from before --training_seed drew LaDiR's new weights from the random state text SFT left
            training_seed = f"{training_seed}, after text SFT"
        trainings.append({
            "report": name,
            "training_seed": training_seed,
            "correct_per_problem": report[recipe]["correct_per_problem"],
            "steps": report.get(f"{recipe}_steps"),  # recorded by reports from after the step budgets
        })
    return trainings


def per_problem_pass_at_k(correct_per_problem, num_samples, k):
    return [100 * pass_at_k(num_samples, c, k) for c in correct_per_problem]


def standard_deviation(values):
    """The sample standard deviation; None for one value (a recipe trained once has no spread to measure)."""
    return statistics.stdev(values) if len(values) > 1 else None


def summarize(reports, text_sft_only=frozenset(), not_compared=frozenset()):
    """`reports`: (name, report) pairs; `text_sft_only`: the names of those whose text SFT part only is pooled;
    `not_compared`: more settings they may differ in."""
    for setting in not_compared:
        if not any(setting in report["settings"] for _, report in reports):
            raise ValueError(f"--not_compared {setting}: no report has that setting.")
    check_same_settings(reports, text_sft_only, not_compared)
    num_samples = reports[0][1]["settings"]["num_samples"]
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= num_samples]
    summary = {"num_samples": num_samples, "reports": [name for name, _ in reports],
               "settings_not_compared": sorted(not_compared)}
    per_problem = {}  # recipe -> k -> each problem's pass@k averaged over the recipe's trainings
    for recipe in ("text_sft", "ladir"):
        trainings = collect_trainings(reports, recipe, text_sft_only)
        if not trainings:
            raise ValueError(f"No training of {recipe} in the reports: list a report that trained it.")
        if len({len(t["correct_per_problem"]) for t in trainings}) != 1:
            raise ValueError(f"The {recipe} trainings were scored on different numbers of problems.")
        part = {"num_trainings": len(trainings), "mean": {}, "standard_deviation": {},
                "trainings": [{"report": t["report"], "training_seed": t["training_seed"], "pass_at_k": {},
                               **({"steps": t["steps"]} if t["steps"] else {})} for t in trainings]}
        per_problem[recipe] = {}
        for k in ks:
            # one column of per-problem pass@k per training
            columns = [per_problem_pass_at_k(t["correct_per_problem"], num_samples, k) for t in trainings]
            values = [mean(column) for column in columns]
            for training, value in zip(part["trainings"], values):
                training["pass_at_k"][f"pass@{k}"] = value
            part["mean"][f"pass@{k}"] = mean(values)
            part["standard_deviation"][f"pass@{k}"] = standard_deviation(values)
            per_problem[recipe][k] = [mean(problem) for problem in zip(*columns)]
        summary[recipe] = part

    if len(per_problem["text_sft"][1]) != len(per_problem["ladir"][1]):
        raise ValueError("The text SFT and LaDiR trainings were scored on different numbers of problems.")
    between, over = {}, {}
    for k in ks:
        key = f"pass@{k}"
        text, ladir = summary["text_sft"], summary["ladir"]
        # the trainings' spread: sd^2 / n of each recipe (none when a recipe was trained once)
        spreads = [(part["standard_deviation"][key], part["num_trainings"]) for part in (ladir, text)]
        standard_error = None if any(sd is None for sd, _ in spreads) else math.sqrt(sum(sd**2 / n for sd, n in spreads))
        between[key] = {"mean": ladir["mean"][key] - text["mean"][key], "standard_error": standard_error}
        differences = [a - b for a, b in zip(per_problem["ladir"][k], per_problem["text_sft"][k], strict=True)]
        over[key] = {"mean": mean(differences),
                     "standard_error": standard_deviation(differences) / math.sqrt(len(differences))}
    summary["ladir_minus_text_sft"] = {"between_trainings": between, "over_problems": over}
    return summary


def main():
    args = parse_args()
    reports, text_sft_only = [], set()
    for path in args.reports + args.text_sft_only:
        # named by its file, or by its folder for a report under ladir_quality.py's own file name
        name = os.path.basename(path)
        if name == "ladir_quality.json":
            name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        with open(path) as f:
            reports.append((name, json.load(f)))
        if path in args.text_sft_only:
            text_sft_only.add(name)
    summary = summarize(reports, text_sft_only, set(args.not_compared))
    summary["text_sft_only"] = sorted(text_sft_only)
    with open(args.output, "w") as f:
        json.dump(summary, f, indent=2)
    ks = list(summary["text_sft"]["mean"])
    print("recipe   training seed   " + "  ".join(f"{k:>8}" for k in ks))
    for recipe in ("text_sft", "ladir"):
        for training in summary[recipe]["trainings"]:
            steps = training.get("steps")
            print(f"{recipe:8} {training['training_seed']!s:>13}   "
                  + "  ".join(f"{training['pass_at_k'][k]:8.1f}" for k in ks)
                  + (f"   steps {steps}" if steps else ""))
        print(f"{recipe:8} {'mean':>13}   " + "  ".join(f"{summary[recipe]['mean'][k]:8.1f}" for k in ks))
    for name, part in summary["ladir_minus_text_sft"].items():
        print(f"LaDiR minus text SFT, {name}: " + ", ".join(
            f"{k} {part[k]['mean']:+.1f}" + ("" if part[k]["standard_error"] is None else f" +- {part[k]['standard_error']:.1f}")
            for k in ks))
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
