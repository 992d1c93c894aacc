"""The same app as app.py, run in Socket Mode by Bolt's own SocketModeHandler instead of
behind flowcoach: the comparison `flowcoach-dev bench --bolt-compare` measures.

Environment: as app.py (SLACK_SIGNING_SECRET is read but not used in Socket Mode), plus
  SLACK_APP_TOKEN       the app-level token (xapp-...), for apps.connections.open
"""

import os

from slack_bolt.adapter.socket_mode import SocketModeHandler

from app import app

if __name__ == "__main__":
    # app.client carries SLACK_API_URL: the Web API and apps.connections.open both go there.
    SocketModeHandler(app, os.environ.pop("SLACK_APP_TOKEN")).start()
