"""A Bolt for Python app in HTTP mode, as it runs behind flowcoach.

flowcoach holds the Socket Mode connection and re-sends each envelope to this app as Slack
would in HTTP mode, signed with the app's signing secret; the app's answers go back in the
acks. Nothing here knows about flowcoach: the same app runs with Slack calling it directly.

Environment:
  SLACK_SIGNING_SECRET  the app's signing secret (every request's signature is checked)
  SLACK_BOT_TOKEN       the bot token (xoxb-...), for the Web API calls (say, ...)
  SLACK_API_URL         the Web API base, default https://slack.com/api
  HOST, PORT            where to listen, default 127.0.0.1:3000 (flowcoach's forward.url);
                        PORT=0 takes any free port, printed on stdout
"""

import os
import re
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIServer, make_server

from slack_bolt import App
from slack_bolt.adapter.wsgi import SlackRequestHandler
from slack_sdk import WebClient

api_url = os.environ.get("SLACK_API_URL", "https://slack.com/api").rstrip("/") + "/"
app = App(
    signing_secret=os.environ["SLACK_SIGNING_SECRET"],
    # Taken out of the environment: Bolt would read it again and warn that `client` wins.
    client=WebClient(token=os.environ.pop("SLACK_BOT_TOKEN"), base_url=api_url),
    # No auth.test at start: the token is checked on the first request instead.
    token_verification_enabled=False,
)

TEAMS = ["engineering", "design", "sales", "support"]


@app.event("app_mention")
def mention(event, say, request):
    # Answered with chat.postMessage. Slack redelivers an event it got no 200 for (the app
    # was down, say) with X-Slack-Retry-Num; the reply says so.
    retry = request.headers.get("x-slack-retry-num", [None])[0]
    redelivered = f" (Slack's retry {retry})" if retry else ""
    say(f"Hello <@{event['user']}>! You said: {event['text']}{redelivered}")


@app.command("/hello")
def hello(command, ack):
    # Answered in the HTTP response: the message the user sees.
    ack(f"Hello, <@{command['user_id']}>! ({command['text']})")


@app.command("/slow")
def slow(command, ack):
    # Slow work before the answer: `/slow 2` takes 2 seconds (at most 2.5, within Bolt's
    # own 3-second ack timeout). Past flowcoach's response_deadline Slack gets the ack
    # without this answer.
    seconds = min(float(command["text"] or "2"), 2.5)
    time.sleep(seconds)
    ack(f"Done after {seconds:g} s.")


@app.action("approve")
def approve(body, ack, respond):
    # Acked at once, answered later through the interaction's response_url.
    ack()
    respond(f"Approved by <@{body['user']['id']}>.")


@app.view("signup")
def signup(view, ack):
    email = view["state"]["values"]["email_block"]["email"]["value"] or ""
    if not re.fullmatch(r"[^@\s]+@[^@\s]+", email):
        ack(response_action="errors", errors={"email_block": "That is not an email address."})
        return
    ack()


@app.options("team")
def teams(payload, ack):
    # External select options (block_suggestion): the teams matching what was typed.
    typed = payload.get("value", "").lower()
    ack(
        options=[
            {"text": {"type": "plain_text", "text": team}, "value": team}
            for team in TEAMS
            if typed in team
        ]
    )


class ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


if __name__ == "__main__":
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "3000"))
    server = make_server(host, port, SlackRequestHandler(app), server_class=ThreadingServer)
    print(f"listening on http://{host}:{server.server_port}/slack/events", flush=True)
    server.serve_forever()
