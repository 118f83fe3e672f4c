"""A matrix-nio bot (PyPI `matrix-nio`, no end-to-end encryption) signing in through the
gateway's compatibility layer, either with a login token (as a bot whose operator did the
single sign-on in a browser) or with a password (`m.login.password`, which the gateway checks
at the OP's password grant; a wrong password is tried first and must be refused with
M_FORBIDDEN). Then: whoami, a room of its own, a message it sends and reads back in its sync,
and `/logout`. tests/e2e_legacy.rs drives it.

    python nio_bot.py --gateway http://127.0.0.1:8008 --login-token mgl_...
    python nio_bot.py --gateway http://127.0.0.1:8008 --user bot --password ...

Prints one line per step (`STEP <name> <json>`) and `OK` at the end; exits 1 on any failure.
"""
import argparse
import asyncio
import json
import secrets
import sys
import time

from nio import (
    AsyncClient,
    LoginError,
    LoginInfoResponse,
    LoginResponse,
    LogoutResponse,
    RoomCreateResponse,
    RoomMessageText,
    RoomSendResponse,
    SyncResponse,
    WhoamiResponse,
)


def out(name, value):
    print(f"STEP {name} {json.dumps(value)}", flush=True)


def check(ok, what):
    if not ok:
        raise RuntimeError(what)


async def main(gateway, login_token, user, password):
    client = AsyncClient(gateway, user=user or "")
    try:
        info = await client.login_info()
        check(isinstance(info, LoginInfoResponse), f"login flows: {info}")
        out("flows", {"types": info.flows})
        check("m.login.token" in info.flows, f"flows {info.flows}")

        if password:
            check("m.login.password" in info.flows, f"flows {info.flows}")
            wrong = await client.login(password=password + "-wrong", device_name="e2e nio bot")
            check(isinstance(wrong, LoginError) and wrong.status_code == "M_FORBIDDEN", f"wrong password: {wrong}")
            out("wrong_password", {"errcode": wrong.status_code})
            login = await client.login(password=password, device_name="e2e nio bot")
        else:
            login = await client.login(token=login_token, device_name="e2e nio bot")
        check(isinstance(login, LoginResponse), f"login: {login}")
        # The driver checks afterwards that this (test-only) token is refused.
        out("signed_in", {"user_id": login.user_id, "device_id": login.device_id,
                          "access_token": login.access_token})

        who = await client.whoami()
        check(isinstance(who, WhoamiResponse), f"whoami: {who}")
        check(who.user_id == login.user_id and who.device_id == login.device_id, f"whoami: {who}")

        room = await client.room_create(name="e2e nio bot")
        check(isinstance(room, RoomCreateResponse), f"room_create: {room}")
        body = f"hello from nio {secrets.token_hex(3)}"
        sent = await client.room_send(room.room_id, "m.room.message", {"msgtype": "m.text", "body": body})
        check(isinstance(sent, RoomSendResponse), f"room_send: {sent}")
        # Dendrite's sync API takes events from its room server asynchronously: a message sent
        # a moment ago may not be in the next sync yet. Full-state syncs for up to ten seconds,
        # as a bot would see the message arrive.
        deadline = time.monotonic() + 10
        while True:
            sync = await client.sync(timeout=0, full_state=True)
            check(isinstance(sync, SyncResponse), f"sync: {sync}")
            joined = sync.rooms.join.get(room.room_id)
            events = joined.timeline.events if joined is not None else []
            seen = [e for e in events if isinstance(e, RoomMessageText) and e.body == body]
            if seen or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        check(joined is not None, "the room is not in the bot's sync")
        check(seen, "the bot's message is not in its sync")
        out("message", {"room_id": room.room_id, "event_id": sent.event_id, "body": body})

        logout = await client.logout()
        check(isinstance(logout, LogoutResponse), f"logout: {logout}")
        out("logged_out", {"device_id": login.device_id})
        print("OK", flush=True)
    finally:
        await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--login-token")
    parser.add_argument("--user")
    parser.add_argument("--password")
    a = parser.parse_args()
    if bool(a.login_token) == bool(a.password) or bool(a.user) != bool(a.password):
        parser.error("either --login-token, or --user and --password")
    try:
        asyncio.run(main(a.gateway, a.login_token, a.user, a.password))
    except Exception as e:  # noqa: BLE001 - report any failure as the test's reason
        print(f"nio bot failed: {e!r}", file=sys.stderr, flush=True)
        sys.exit(1)
