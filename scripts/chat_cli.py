"""Chat with a checkpoint in the terminal: a multi-turn REPL with streamed replies, or one prompt for scripts.

    python -m scripts.chat_cli [--stage sft] [--tag TAG] [--step N] [--init-from SPEC]
    python -m scripts.chat_cli -p "What is 12*7?"          # one reply, then exit

The think span is shown dimmed on a terminal and as "[thinking] ... [/thinking]" otherwise. In the REPL:
/clear (forget the conversation), /temp X, /think on|off (show or hide the think span), /quit. Ctrl-C stops
the reply being generated and keeps the session. Requests go through the same checks and decoding as the
web server (both use reasoning.chat), so both see the same replies.
"""

import argparse
import math
import sys

from reasoning.chat import (DEFAULT_MAX_TOKENS, MAX_TEMPERATURE, REASONING, ReplyDecoder, RequestError,
                            conversation_from_messages, fit_prompt, stream_reply)
from reasoning.checkpoint import ModelSource, add_model_args
from reasoning.common import UserError, get_device, run_main
from reasoning.engine import Engine
from reasoning.latent import serving_mode

HELP = "commands: /clear  /temp X  /think on|off  /quit   (Ctrl-C stops a reply, Ctrl-D quits)"
DIM, RESET = "\x1b[2m", "\x1b[0m"


class ReplyPrinter:
    """Writes streamed deltas, marking the think span: ANSI dim on a terminal, [thinking] tags elsewhere."""

    def __init__(self, out, color: bool, show_think: bool):
        self.out, self.color, self.show_think = out, color, show_think
        self.in_think = False

    def write(self, channel: str, text: str):
        thinking = channel == REASONING
        if thinking and not self.show_think:
            return
        if thinking != self.in_think:
            self._switch(thinking)
        self.out.write(text)
        self.out.flush()

    def _switch(self, thinking: bool):
        if thinking:
            self.out.write(DIM if self.color else "[thinking] ")
        else:
            self.out.write(RESET + "\n" if self.color else " [/thinking]\n")
        self.in_think = thinking

    def end(self):
        if self.in_think:
            self.out.write(RESET if self.color else " [/thinking]")
            self.in_think = False
        self.out.write("\n")
        self.out.flush()


class ChatSession:
    """The conversation so far and the sampling settings; one `reply` per user turn."""

    def __init__(self, engine: Engine, tokenizer, args):
        self.engine, self.tokenizer = engine, tokenizer
        self.max_seq_len = engine.model.config.max_seq_len
        self.temperature, self.show_think = args.temperature, not args.hide_think
        self.top_p, self.max_tokens, self.seed, self.system = args.top_p, args.max_tokens, args.seed, args.system
        self.history = []

    def reply(self, user_text: str, out, color: bool):
        """Stream the assistant's answer to `user_text`; the turn joins the history unless nothing came back."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": user_text})
        prompt_ids, max_tokens = fit_prompt(conversation_from_messages(messages), self.tokenizer, self.max_seq_len,
                                            self.max_tokens, DEFAULT_MAX_TOKENS)
        decoder = ReplyDecoder(self.tokenizer)
        printer = ReplyPrinter(out, color, self.show_think)
        deltas = stream_reply(self.engine, prompt_ids, decoder, max_tokens=max_tokens, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed)
        interrupted = False
        try:
            for channel, text in deltas:
                printer.write(channel, text)
        except KeyboardInterrupt:  # stop this reply, keep the session
            interrupted = True
        finally:
            deltas.close()  # stops the engine and frees its cache
            printer.end()
        if interrupted:
            out.write("[interrupted]\n")
        if decoder.content or decoder.reasoning:
            self.history += [{"role": "user", "content": user_text},
                             {"role": "assistant", "content": decoder.content, "reasoning_content": decoder.reasoning}]
        elif not interrupted:
            out.write("[empty reply: not kept in the conversation]\n")
        out.flush()


def check_temperature(value: float, where: str) -> float:
    """The one check of a temperature typed by the user (--temperature, /temp); NaN fails it too."""
    if not 0 <= value <= MAX_TEMPERATURE:
        raise UserError(f"{where}: expected a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy)")
    return value


def flag_message(error: RequestError, source: str | None = None) -> str:
    """The request checker's message in this script's terms: a max_tokens refusal names --max-tokens, anything
    else is about the text typed (named `source` when given)."""
    if error.param == "max_tokens":
        return "--max-tokens" + error.message.removeprefix("max_tokens")
    return f"{source}: {error.message}" if source else error.message


def handle_command(session: ChatSession, line: str, out) -> bool:
    """Run a /command; False means quit."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/clear":
        session.history = []
        out.write("[conversation cleared]\n")
    elif name == "/temp":
        try:
            session.temperature = check_temperature(_float_or_nan(argument), f"/temp {argument}")
            out.write(f"[temperature {session.temperature:g}]\n")
        except UserError as e:
            out.write(f"{e}\n")
    elif name == "/think" and argument in ("on", "off"):
        session.show_think = argument == "on"
        out.write(f"[thinking {'shown' if session.show_think else 'hidden'}]\n")
    else:
        out.write(f"unknown command {line!r}; {HELP}\n")
    out.flush()
    return True


def _float_or_nan(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def repl(session: ChatSession, out, interactive: bool):
    if interactive:
        out.write(HELP + "\n")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            out.write("\n(use /quit or Ctrl-D to leave)\n")
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not handle_command(session, line, out):
                break
            continue
        if interactive:
            out.write("assistant> ")
        try:
            session.reply(line, out, color=interactive)
        except RequestError as e:
            hint = " (try /clear)" if e.code == "context_length_exceeded" else ""
            out.write(f"error: {flag_message(e)}{hint}\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, default_stage="sft")
    parser.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature, 0 = greedy (0.6)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default off)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help=f"longest reply in tokens (default: {DEFAULT_MAX_TOKENS}, or what the model's context "
                             "leaves after the conversation if less)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: fresh each reply)")
    parser.add_argument("--system", default=None, help="a system message to start the conversation with")
    parser.add_argument("--hide-think", action="store_true", help="do not show the think span (REPL: /think on)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: autodetect)")
    args = parser.parse_args()
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("-p/--prompt: expected a non-empty prompt")
    check_temperature(args.temperature, f"--temperature {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: expected a number in (0, 1]")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens {args.max_tokens}: expected an integer >= 1")
    source = ModelSource.from_args(args)
    model, tokenizer, meta = source.load(get_device(args.device))
    tokenizer, latent_steps = serving_mode(tokenizer, meta)  # a chat_latent checkpoint thinks in latent steps
    if args.max_tokens is not None and args.max_tokens > model.config.max_seq_len:
        raise UserError(f"--max-tokens {args.max_tokens}: longer than the model's context "
                        f"({model.config.max_seq_len} tokens)")
    session = ChatSession(Engine(model, tokenizer, latent_steps=latent_steps), tokenizer, args)
    if args.prompt is not None:
        try:
            session.reply(args.prompt, sys.stdout, color=False)
        except RequestError as e:
            raise UserError(flag_message(e, "-p/--prompt")) from None
        return
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        print(f"chatting with {source.label} ({model.num_params() / 1e6:.1f}M parameters)")
    repl(session, sys.stdout, interactive)


if __name__ == "__main__":
    run_main(main)
