// What a reader sees: Dendrite's sync API takes events from the room server asynchronously, so
// a message sent a moment ago may not be in `/messages` yet. A client sees it arrive a moment
// later; these helpers wait for it the same way, for a bounded time, and return what was last
// read so a failure can say what the reader saw.
import { Direction } from 'matrix-js-sdk';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// The newest page of `roomId` as `client` reads it, until `body` is in it or `ms` have passed.
export async function readUntilSeen(client, roomId, body, ms = 10000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const page = await client.createMessagesRequest(roomId, null, 20, Direction.Backward);
    const seen = page.chunk.find((e) => e.type === 'm.room.message' && e.content?.body === body);
    if (seen || Date.now() > deadline) return { seen, chunk: page.chunk };
    await sleep(200);
  }
}

// `/sync` (no long-poll) with `token` until it lists `roomId` as joined, or `ms` have passed.
export async function syncUntilJoined(baseUrl, token, roomId, ms = 10000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const res = await fetch(`${baseUrl}/_matrix/client/v3/sync?timeout=0`, { headers: { authorization: `Bearer ${token}` } });
    const sync = await res.json();
    if (sync.rooms?.join?.[roomId] || Date.now() > deadline) return sync;
    await sleep(200);
  }
}
