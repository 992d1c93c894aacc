// A Bolt for JavaScript app in HTTP mode, as it runs behind flowcoach.
//
// flowcoach holds the Socket Mode connection and re-sends each envelope to this app as
// Slack would in HTTP mode, signed with the app's signing secret; the app's answers go back
// in the acks. Nothing here knows about flowcoach: the same app runs with Slack calling it
// directly.
//
// Environment:
//   SLACK_SIGNING_SECRET  the app's signing secret (every request's signature is checked)
//   SLACK_BOT_TOKEN       the bot token (xoxb-...), for the Web API calls (say, ...)
//   SLACK_API_URL         the Web API base, default https://slack.com/api
//   HOST, PORT            where to listen, default 127.0.0.1:3000 (flowcoach's forward.url);
//                         PORT=0 takes any free port, printed on stdout

const { App } = require('@slack/bolt');

const apiUrl = `${(process.env.SLACK_API_URL || 'https://slack.com/api').replace(/\/+$/, '')}/`;
const app = new App({
  signingSecret: process.env.SLACK_SIGNING_SECRET,
  token: process.env.SLACK_BOT_TOKEN,
  // No auth.test at start: the token is checked on the first request instead.
  tokenVerificationEnabled: false,
  clientOptions: { slackApiUrl: apiUrl },
});

const TEAMS = ['engineering', 'design', 'sales', 'support'];

app.event('app_mention', async ({ event, context, say }) => {
  // Answered with chat.postMessage. Slack redelivers an event it got no 200 for (the app
  // was down, say) with X-Slack-Retry-Num; the reply says so.
  const redelivered = context.retryNum ? ` (Slack's retry ${context.retryNum})` : '';
  await say(`Hello <@${event.user}>! You said: ${event.text}${redelivered}`);
});

app.command('/hello', async ({ command, ack }) => {
  // Answered in the HTTP response: the message the user sees.
  await ack(`Hello, <@${command.user_id}>! (${command.text})`);
});

app.command('/slow', async ({ command, ack }) => {
  // Slow work before the answer: `/slow 2` takes 2 seconds (at most 2.5, within Bolt's
  // own 3-second ack timeout). Past flowcoach's response_deadline Slack gets the ack
  // without this answer.
  const seconds = Math.min(Number(command.text || '2'), 2.5);
  await new Promise((resolve) => { setTimeout(resolve, seconds * 1000); });
  await ack(`Done after ${seconds} s.`);
});

app.action('approve', async ({ body, ack, respond }) => {
  // Acked at once, answered later through the interaction's response_url.
  await ack();
  await respond(`Approved by <@${body.user.id}>.`);
});

app.view('signup', async ({ view, ack }) => {
  const email = view.state.values.email_block.email.value || '';
  if (!/^[^@\s]+@[^@\s]+$/.test(email)) {
    await ack({ response_action: 'errors', errors: { email_block: 'That is not an email address.' } });
    return;
  }
  await ack();
});

app.options('team', async ({ payload, ack }) => {
  // External select options (block_suggestion): the teams matching what was typed.
  const typed = (payload.value || '').toLowerCase();
  await ack({
    options: TEAMS.filter((team) => team.includes(typed)).map((team) => ({
      text: { type: 'plain_text', text: team },
      value: team,
    })),
  });
});

(async () => {
  const host = process.env.HOST || '127.0.0.1';
  const port = Number(process.env.PORT || 3000);
  const server = await app.start({ port, host });
  console.log(`listening on http://${host}:${server.address().port}/slack/events`);
})();
