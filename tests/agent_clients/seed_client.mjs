// The agent client classes from the agent signaling API guide, unchanged; the tests
// drive them against `tunnel signal` to prove the server is a drop-in for the original.
import EventSource from 'eventsource';

const SIGNAL_SERVER_URL = "http://localhost:3000";
const ROOM_NAME = "AGENT-COORDINATION";

class NodeAgentClient {
  constructor(serverUrl, room) {
    this.serverUrl = serverUrl;
    this.room = room;
    this.clientId = null;
    this.token = null;
    this.iceServers = null;
    this.roster = [];
    this.es = null;
  }

  connect() {
    const url = `${this.serverUrl}/api/connect?room=${this.room}`;
    console.log(`Connecting to ${url}...`);

    this.es = new EventSource(url);

    this.es.addEventListener('joined', (e) => {
      const data = JSON.parse(e.data);
      this.clientId = data.id;
      this.token = data.token;
      this.iceServers = data.iceServers;
      console.log(`[Joined] Assigned ID: ${this.clientId}`);
    });

    this.es.addEventListener('roster', (e) => {
      this.roster = JSON.parse(e.data);
      console.log(`[Roster Update] Active peers:`, this.roster);
    });

    this.es.addEventListener('signal', (e) => {
      const { sender, signal } = JSON.parse(e.data);
      console.log(`[Signal Received] From ${sender}:`, signal);
      this.onSignal(sender, signal);
    });

    this.es.onerror = (err) => {
      console.error('[Signaling Connection Error]', err);
    };
  }

  onSignal(sender, signal) {
    // Implement your WebRTC handler or custom protocol here
  }

  async sendSignal(targetId, signalPayload) {
    if (!this.clientId || !this.token) {
      console.warn("Cannot send signal: client not registered.");
      return;
    }

    const url = `${this.serverUrl}/api/signal?room=${this.room}`;
    try {
      const response = await fetch(url, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({
          sender: this.clientId,
          to: targetId,
          token: this.token,
          signal: signalPayload
        })
      });
      const data = await response.json();
      if (data.success) {
        console.log(`[Signal Sent] Dispatched payload to ${targetId}`);
      } else {
        console.error(`[Error] Failed to send signal:`, data.error);
      }
    } catch (err) {
      console.error('Network error sending signal:', err);
    }
  }

  async leave() {
    if (!this.clientId || !this.token) return;
    const url = `${this.serverUrl}/api/leave?room=${this.room}`;
    try {
      await fetch(url, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ sender: this.clientId, token: this.token })
      });
      console.log("Left room successfully.");
    } catch (e) {
      console.error("Error leaving room:", e);
    } finally {
      if (this.es) {
        this.es.close();
      }
    }
  }
}

export default NodeAgentClient;
