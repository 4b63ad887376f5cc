# The agent client classes from the agent signaling API guide, unchanged; the tests
# drive them against `tunnel signal` to prove the server is a drop-in for the original.
import asyncio
import json
import httpx

SIGNAL_SERVER_URL = "http://localhost:3000"  # Update with your deployment URL
ROOM_NAME = "AGENT-COORDINATION"

class AgentSignalingClient:
    def __init__(self, server_url: str, room: str):
        self.server_url = server_url
        self.room = room
        self.client_id = None
        self.token = None
        self.ice_servers = None
        self.roster = []
        self.http_client = httpx.AsyncClient()

    async def connect(self):
        url = f"{self.server_url}/api/connect?room={self.room}"
        print(f"Connecting to room '{self.room}' SSE stream...")
        
        async with self.http_client.stream("GET", url, timeout=None) as response:
            if response.status_code != 200:
                print(f"Failed to connect: {response.status_code}")
                return

            # SSE line-by-line parser
            event_type = None
            async for line in response.iter_lines():
                if not line.strip():
                    continue
                
                if line.startswith("event:"):
                    event_type = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    data_str = line.split(":", 1)[1].strip()
                    await self.handle_event(event_type, data_str)
                    event_type = None

    async def handle_event(self, event_type: str, data_str: str):
        data = json.loads(data_str)
        if event_type == "joined":
            self.client_id = data["id"]
            self.token = data["token"]
            self.ice_servers = data.get("iceServers")
            print(f"[Joined] Assigned Peer ID: {self.client_id}")
            print(f"[Joined] Private Token: {self.token}")
            
        elif event_type == "roster":
            self.roster = data
            print(f"[Roster Update] Active peers: {self.roster}")
            
        elif event_type == "signal":
            sender = data["sender"]
            signal = data["signal"]
            print(f"[Signal Received] From {sender}: {signal}")
            await self.on_signal(sender, signal)

    async def on_signal(self, sender: str, signal: dict):
        # Implement your agent decision logic / WebRTC handshaking here
        # Example: Respond with a greeting or acknowledge the SDP
        pass

    async def send_signal(self, target_id: str, signal_payload: dict):
        if not self.client_id or not self.token:
            print("Cannot send signal: Not authenticated yet.")
            return

        url = f"{self.server_url}/api/signal?room={self.room}"
        payload = {
            "sender": self.client_id,
            "to": target_id,
            "token": self.token,
            "signal": signal_payload
        }
        
        res = await self.http_client.post(url, json=payload)
        if res.status_code == 200:
            print(f"[Signal Sent] Successfully sent payload to {target_id}")
        else:
            print(f"[Error] Failed to send signal: {res.text}")

    async def leave(self):
        if not self.client_id or not self.token:
            return
        url = f"{self.server_url}/api/leave?room={self.room}"
        await self.http_client.post(url, json={"sender": self.client_id, "token": self.token})
        print("Left the room.")
        await self.http_client.aclose()

