// RP-initiated logout (OpenID Connect RP-Initiated Logout 1.0) in the browser session mint.mjs
// (or sso.mjs) saved: GET /session/end with the id_token_hint, then the confirmation form, as a user would.
// The OP ends the session and, before it answers, posts logout tokens to every client's
// back-channel logout URI.
//
//   node logout.mjs --issuer http://127.0.0.1:9400 --jar FILE
import { readFileSync } from 'node:fs';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const issuer = args.issuer || 'http://127.0.0.1:9400';
const saved = JSON.parse(readFileSync(args.jar, 'utf8'));
const cookies = new Map(saved.cookies);
const cookieHeader = () => [...cookies].map(([k, v]) => `${k}=${v}`).join('; ');
const take = (res) => {
  for (const c of res.headers.getSetCookie()) {
    const [pair] = c.split(';');
    const i = pair.indexOf('=');
    cookies.set(pair.slice(0, i), pair.slice(i + 1));
  }
};

const end = new URL(`${issuer}/session/end`);
// Without an ID token (a sign-in another client made, e.g. the gateway's legacy login), the
// OP ends the session its cookie names.
if (saved.id_token) end.searchParams.set('id_token_hint', saved.id_token);
let res = await fetch(end, { redirect: 'manual', headers: { cookie: cookieHeader() } });
take(res);
const html = await res.text();
const xsrf = /name="xsrf" value="([^"]+)"/.exec(html)?.[1];
if (!xsrf) throw new Error(`no logout form (status ${res.status}): ${html.slice(0, 300)}`);
res = await fetch(`${issuer}/session/end/confirm`, {
  method: 'POST',
  redirect: 'manual',
  headers: { cookie: cookieHeader(), 'content-type': 'application/x-www-form-urlencoded' },
  body: new URLSearchParams({ xsrf, logout: 'yes' }),
});
if (res.status !== 303 && res.status !== 302 && res.status !== 200) {
  throw new Error(`logout confirmation failed: ${res.status} ${await res.text()}`);
}
process.stdout.write('LOGGED_OUT\n');
