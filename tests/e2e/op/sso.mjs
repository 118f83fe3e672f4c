// A user's browser through the gateway's legacy single sign-on (docs/compat.md): starts at the
// gateway's `/login/sso/redirect`, signs in and consents at the OP (browser.mjs's dev
// interaction forms), and follows the OP back through the gateway's callback until the gateway
// either redirects to the client's `redirectUrl` or shows its confirmation page.
//
//   node sso.mjs --url <gateway sso redirect URL> --user alice --redirect URL [--jar FILE]
//
// Prints `REDIRECT <url>` (the client's URL, with `loginToken`) or `PAGE <status> <json of the
// page's text>` (anything the gateway answered instead of a redirect); with --jar, saves the
// browser's cookies there (for logout.mjs: an RP-initiated logout of this OP session).
import { writeFileSync } from 'node:fs';
import { Jar, step } from './browser.mjs';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const jar = new Jar();
const start = new URL(args.url);
let res = await step(jar, start);
let here = start;
let done = false;
for (let i = 0; i < 16 && !done; i += 1) {
  const location = res.headers.get('location');
  if (!location) {
    process.stdout.write(`PAGE ${res.status} ${JSON.stringify(await res.text())}\n`);
    done = true;
    break;
  }
  const next = new URL(location, here);
  if (next.href.startsWith(args.redirect)) {
    process.stdout.write(`REDIRECT ${next.href}\n`);
    done = true;
    break;
  }
  here = next;
  if (next.pathname.startsWith('/interaction/')) {
    const page = await step(jar, next);
    const html = await page.text();
    const prompt = html.includes('name="login"') ? 'login' : 'consent';
    const form = new URLSearchParams(prompt === 'login' ? { prompt, login: args.user, password: 'any' } : { prompt });
    res = await step(jar, next, { method: 'POST', body: form });
  } else {
    res = await step(jar, next);
  }
}
if (!done) throw new Error('too many redirects');
if (args.jar) writeFileSync(args.jar, JSON.stringify({ cookies: [...jar.cookies] }));
