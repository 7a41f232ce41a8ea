"""A WebRTC peer in its own process (so a test can SIGKILL it): offers over HTTP, opens the
events channel, prints ``ready <seq>`` once the first envelope arrives, then idles."""

from __future__ import annotations

import sys

import anyio
import httpx
from webrtc_peer import connect


async def main(url: str, session_id: str, token: str) -> None:
    async def offer(sdp: str) -> str:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            r = await c.post(f"/v1/sessions/{session_id}/webrtc",
                             json={"type": "offer", "sdp": sdp},
                             headers={"Authorization": f"Bearer {token}"})
            r.raise_for_status()
            answer: str = r.json()["sdp"]
            return answer

    async with connect(offer) as peer:
        peer.events.send({"after": 0})
        await peer.events.receive()  # ready
        env = await peer.events.envelope()
        print(f"ready {env['seq']}", flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:4])
