// A headless browser for the e2e OP's sign-in: follows an authorization URL through the dev
// login and consent forms (posted with a cookie jar), as a user's browser would, and returns the
// URL the OP finally redirects to (the client's callback, with `code` or `error`).
//
//   import { authorize, Jar } from './browser.mjs';
//   const callback = await authorize(authUrl, { user: 'alice', redirect: 'http://127.0.0.1/cb' });

export class Jar {
  constructor() { this.cookies = new Map(); }
  take(res) {
    for (const c of res.headers.getSetCookie()) {
      const [pair] = c.split(';');
      const i = pair.indexOf('=');
      this.cookies.set(pair.slice(0, i), pair.slice(i + 1));
    }
  }
  header() { return [...this.cookies].map(([k, v]) => `${k}=${v}`).join('; '); }
}

export async function step(jar, url, init = {}) {
  const res = await fetch(url, { ...init, redirect: 'manual', headers: { ...(init.headers || {}), cookie: jar.header() } });
  jar.take(res);
  return res;
}

// Signs `user` in at the OP (any password) and consents; the callback URL (a string).
export async function authorize(authUrl, { user, redirect, jar = new Jar() }) {
  let here = new URL(authUrl);
  let res = await step(jar, here);
  for (let i = 0; i < 16; i += 1) {
    const location = res.headers.get('location');
    if (!location) throw new Error(`no redirect (status ${res.status}): ${await res.text()}`);
    // Relative to the page that redirected (the OP's, or a gateway's in front of it).
    const next = new URL(location, here);
    if (next.href.startsWith(redirect)) return next.href;
    here = next;
    if (next.pathname.startsWith('/interaction/')) {
      const page = await step(jar, next);
      const html = await page.text();
      const prompt = html.includes('name="login"') ? 'login' : 'consent';
      const form = new URLSearchParams(prompt === 'login' ? { prompt, login: user, password: 'any' } : { prompt });
      res = await step(jar, next, { method: 'POST', body: form });
    } else {
      res = await step(jar, next);
    }
  }
  throw new Error('too many redirects');
}
