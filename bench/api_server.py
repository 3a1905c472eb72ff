"""`iiot api` plus one constant endpoint, the API benchmark's baseline in the same server."""

from api.app import create_app
from api.settings import ApiSettings
from iiot.loop import serve
from iiot.server import ApiServer


def main() -> None:
    settings = ApiSettings()
    app = create_app(settings)

    @app.get("/bench/constant", include_in_schema=False)
    async def constant() -> dict[str, int]:
        return {"registered": 1000, "connected": 1000}

    server = ApiServer(app, host=settings.api_host, port=settings.api_port)
    serve(server.run())


if __name__ == "__main__":
    main()
