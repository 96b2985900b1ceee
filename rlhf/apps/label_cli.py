"""`rlhf-label`: the Hydra app of the labelling session (web page or terminal)."""

from __future__ import annotations

import shutil
import sys
import textwrap

import hydra
from omegaconf import DictConfig

from rlhf.apps import hydra_setup
from rlhf.apps.label import PreferenceFileError, Session, agreement_line, build_session, next_steps
from rlhf.core.run.rundir import RunDirBusy

TERMINAL_KEYS = {"1": "left", "l": "left", "left": "left", "2": "right", "r": "right", "right": "right",
                 "t": "tie", "tie": "tie", "s": "skip", "skip": "skip"}
TERMINAL_HELP = "1 or l: left is better   2 or r: right is better   t: tie   s: skip   q: quit (answers are saved)"


def side_by_side(left: str, right: str, width: int) -> str:
    col = max(20, (width - 3) // 2)
    a, b = textwrap.wrap(left, col) or [""], textwrap.wrap(right, col) or [""]
    rows = [f"{x:<{col}} | {y}" for x, y in zip(a + [""] * (len(b) - len(a)), b + [""] * (len(a) - len(b)))]
    return "\n".join([f"{'LEFT (1)':<{col}} | RIGHT (2)", "-" * (2 * col + 3), *rows])


def run_terminal(session: Session, out: str) -> None:
    width = shutil.get_terminal_size((100, 24)).columns
    while (pair := session.current()) is not None:
        p = session.progress()
        print(f"\n[{p['answered'] + 1}/{p['total']}] prompt: {pair.prompt}\n")
        print(side_by_side(pair.left, pair.right, width))
        while True:
            try:
                key = input(f"\n{TERMINAL_HELP}\n> ").strip().lower()
            except EOFError:  # Ctrl-D or a closed pipe: stop, keeping every answer given
                key = "q"
            if key in ("q", "quit"):
                print(f"\nstopped; {session.progress()['answered']} answers are in {out}; run the same command to continue")
                return
            if key in TERMINAL_KEYS:
                session.answer(pair.index, TERMINAL_KEYS[key])
                break
            print(f"unknown answer {key!r}")
    finish(session, out)


def finish(session: Session, out: str) -> None:
    p = session.progress()
    print(f"\nall {p['total']} pairs answered: {p['preferred']} preferences, {p['ties']} ties, {p['skips']} skipped, in {out}")
    print(agreement_line(session.agreement()))
    print(next_steps(out))


def check_port(host: str, port: int) -> None:
    """Fail before the model loads if the page cannot be served there."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as e:
        raise SystemExit(f"rlhf-label: cannot serve on {host}:{port} ({e.strerror}); "
                         "choose another with label.port=<n> (0 picks a free one)") from None


@hydra.main(config_path="pkg://rlhf.conf", config_name="label", version_base="1.3")
def _label(cfg: DictConfig) -> None:
    if cfg.label.mode == "web":
        check_port(cfg.label.host, cfg.label.port)
    with hydra_setup.refusing(PreferenceFileError, RunDirBusy):  # every refusal of the set-up: one line
        session = build_session(cfg)
    out = cfg.label.out
    if session.next_index() is None:
        print(f"all {cfg.label.pairs} pairs of {out} are answered already; raise label.pairs to label more")
        finish(session, out)
        return
    if cfg.label.mode == "terminal":
        run_terminal(session, out)
        return
    from rlhf.apps.label_web import make_app, serve

    app = make_app(session, out, next_steps(out), agreement_line)
    def announce(url):
        print(f"label in your browser: {url}   (Ctrl-C stops; answers are saved as you go)", flush=True)
    try:
        serve(app, cfg.label.host, cfg.label.port, cfg.label.exit_when_done, announce)
    except KeyboardInterrupt:
        pass
    if session.next_index() is None:
        finish(session, out)
    else:
        print(f"stopped; {session.progress()['answered']} answers are in {out}; run the same command to continue")


def main() -> None:
    hydra_setup.prepare()
    _label()


if __name__ == "__main__":
    sys.exit(main())
