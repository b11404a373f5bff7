"""The arithmetic task: problems, the text format, the verifier.

A problem is a left-to-right chain of 2-4 non-negative integers joined by + - *, written with
parentheses so that no precedence rule is needed. The prompt and a correct completion:

    Q: ((12+7)*3)-5
    12 + 7 = 19
    19 * 3 = 57
    57 - 5 = 52
    Answer: 52

The prompt is the first line including its newline. The completion has one line per operation,
`a op b = c`, each ending in a newline, then the answer line without a newline (EOS follows).

A step is correct when it follows from the line above: `a` is the previous step's written result
(the first operand for the first step), `op b` is the next operation of the problem, and
`c = a op b`. So a slip costs that step and (through the carried value) the answer, not every
later step. The answer is correct when the last line is `Answer: <true value>`.
"""

import hashlib
import random
import re
from dataclasses import dataclass

OPS = "+-*"
MAX_VALUE = 99  # every intermediate value stays in [0, MAX_VALUE]
STEP_RE = re.compile(r"(-?\d+) ([+*-]) (\d+) = (-?\d+)")  # a slip can carry a negative value
ANSWER_RE = re.compile(r"Answer: (-?\d+)")


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def sample_problem(rng: random.Random) -> tuple[list[int], list[str]]:
    """Operands and operators of a random chain: one-digit operands (factors 2-5) and values below 100,
    what a ~1M-parameter model learns to do, unreliably, in a few minutes (with operands up to 20 and values
    up to 199 it stayed at 34% greedy accuracy after the same 1000 steps)."""
    n_operands = rng.randint(2, 4)
    operands, ops = [rng.randint(1, 9)], []
    value = operands[0]
    while len(operands) < n_operands:
        op = rng.choice(OPS)
        b = rng.randint(2, 5) if op == "*" else rng.randint(1, 9)
        if 0 <= apply(value, op, b) <= MAX_VALUE:
            operands.append(b)
            ops.append(op)
            value = apply(value, op, b)
    return operands, ops


def question(operands: list[int], ops: list[str]) -> str:
    """The expression, e.g. `((12+7)*3)-5` (the user message in the conversational format)."""
    text = str(operands[0])
    for i, (op, b) in enumerate(zip(ops, operands[1:])):
        text = f"({text}{op}{b})" if i < len(ops) - 1 else f"{text}{op}{b}"
    return text


def format_prompt(question_text: str) -> str:
    return f"Q: {question_text}\n"


def parse_problem(prompt: str) -> tuple[list[int], list[str]]:
    """Inverse of format_prompt(question(...)); raises ValueError on anything else."""
    match = re.fullmatch(r"Q: ([()\d+*-]+)\n", prompt)
    if match is None:
        raise ValueError(f"not a problem prompt: {prompt!r}")
    tokens = re.findall(r"\d+|[+*-]", match.group(1).replace("(", "").replace(")", ""))
    return [int(t) for t in tokens[0::2]], tokens[1::2]


def solve(operands: list[int], ops: list[str]) -> list[tuple[int, str, int, int]]:
    """The correct steps (a, op, b, c)."""
    steps, value = [], operands[0]
    for op, b in zip(ops, operands[1:]):
        steps.append((value, op, b, apply(value, op, b)))
        value = apply(value, op, b)
    return steps


def format_step(a: int, op: str, b: int, c: int) -> str:
    return f"{a} {op} {b} = {c}\n"


def format_solution(steps: list[tuple[int, str, int, int]]) -> str:
    """A completion whose answer is the last step's result (as written, right or wrong)."""
    return "".join(format_step(*s) for s in steps) + f"Answer: {steps[-1][3]}"


def parse_answer(completion: str) -> int | None:
    """The integer on the last line if that line is `Answer: N`, else None."""
    match = ANSWER_RE.fullmatch(completion.split("\n")[-1])
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Grade:
    correct_steps: int
    total_steps: int  # the number of operations in the problem
    answer_correct: bool

    @property
    def correct(self) -> bool:
        """Fully right: every step and the answer (the label of the unpaired data)."""
        return self.answer_correct and self.correct_steps == self.total_steps

    @property
    def score(self) -> float:
        """In [0, 2]: the answer counts 1, the steps share the other 1 (the lists' scores)."""
        return float(self.answer_correct) + self.correct_steps / self.total_steps


def check_steps(prompt: str, completion: str) -> list[bool]:
    """Whether each step is correct: line i of the completion against operation i of the problem
    (a missing or unreadable line is wrong, and so is the step after it)."""
    operands, ops = parse_problem(prompt)
    lines = completion.split("\n")
    verdicts, previous = [], operands[0]
    for i, (op, b) in enumerate(zip(ops, operands[1:])):
        match = STEP_RE.fullmatch(lines[i]) if i < len(lines) else None
        if match is None:
            verdicts.append(False)
            previous = None
            continue
        a, step_op, step_b, c = int(match[1]), match[2], int(match[3]), int(match[4])
        verdicts.append((a, step_op, step_b, c) == (previous, op, b, apply(a, op, b)))
        previous = c
    return verdicts


def grade(prompt: str, completion: str) -> Grade:
    operands, ops = parse_problem(prompt)
    steps = check_steps(prompt, completion)
    return Grade(sum(steps), len(steps), parse_answer(completion) == solve(operands, ops)[-1][3])


def split_of(question_text: str) -> str:
    """`eval`, `test` or `train`, fixed by a hash of the question, so that held-out problems
    are never trained on (the base model's training data skips them too)."""
    bucket = int(hashlib.sha256(question_text.encode()).hexdigest()[:8], 16) % 20
    return "eval" if bucket == 0 else "test" if bucket == 1 else "train"


def sample_distinct_prompts(rng: random.Random, n: int, split: str) -> list[str]:
    """n distinct prompts of one split, in sampling order."""
    seen: dict[str, None] = {}
    while len(seen) < n:
        q = question(*sample_problem(rng))
        if split_of(q) == split:
            seen.setdefault(format_prompt(q))
    return list(seen)
