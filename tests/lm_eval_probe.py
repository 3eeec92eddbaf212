"""Run by tests/test_lm_eval.py in a fresh, offline process: load the svdicl lm-eval tasks (tag `svdicl`) with
lm-eval's TaskManager and print, as JSON, what lm-eval would prompt and every warning it gave.

    python lm_eval_probe.py TASK_DIR DEMONSTRATIONS_JSON     (run in the data folder; DEMONSTRATIONS_JSON maps a
                                                             task to the train rows to render as demonstrations)
"""

import json
import logging
import sys
import warnings

messages = []


class Keep(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        messages.append(f"{record.name}: {record.getMessage()}")


logging.getLogger().addHandler(Keep(level=logging.WARNING))
logging.getLogger().setLevel(logging.WARNING)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from lm_eval.tasks import TaskManager

    rows = json.loads(sys.argv[2])
    tasks = TaskManager(include_path=sys.argv[1], include_defaults=False).load(["svdicl"])["tasks"]
    found = {}
    for name, task in tasks.items():
        docs = list(task.test_docs() if task.has_test_docs() else task.validation_docs())
        train = list(task.training_docs())
        delimiter, end = task.config.target_delimiter, task.config.fewshot_delimiter
        found[name] = {
            "queries": [task.doc_to_text(doc) for doc in docs],
            "choices": [task.doc_to_choice(doc) for doc in docs],
            "targets": [task.doc_to_target(doc) for doc in docs],
            "demonstrations": [
                task.doc_to_text(d) + delimiter + task.doc_to_choice(d)[task.doc_to_target(d)] + end
                for d in (train[i] for i in rows[name])
            ],
            "target_delimiter": delimiter,
            "higher_is_better": task.higher_is_better(),
            "f1_of_sample": task.aggregation()["f1"]([(0, 0), (1, 1), (1, 0), (0, 0), (1, 1)]),
        }
messages += [f"{w.category.__name__}: {w.message}" for w in caught if "lm_eval" in w.filename]
print(json.dumps({"tasks": found, "warnings": messages}))
