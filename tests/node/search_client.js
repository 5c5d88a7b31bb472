// Calls cbir.v1.SearchService/Search on a running gateway from Node.js (@grpc/grpc-js +
// @grpc/proto-loader, loading the public .proto files) and prints the response as JSON.
//
// Usage: node search_client.js TARGET (--image FILE | --item-id ID) [--k N] [--label L]
//        [--api-key KEY] [--timeout SECONDS]
// Exit code 0 with the response on stdout, or 1 with "CODE_NAME: details" on stderr.
const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

function parseArgs(argv) {
  const args = { target: argv[0], k: 0, labels: [], timeout: 30 };
  for (let i = 1; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (flag === "--image") args.image = fs.readFileSync(value);
    else if (flag === "--item-id") args.itemId = value;
    else if (flag === "--k") args.k = Number(value);
    else if (flag === "--label") args.labels.push(value);
    else if (flag === "--api-key") args.apiKey = value;
    else if (flag === "--timeout") args.timeout = Number(value);
    else throw new Error(`unknown flag ${flag}`);
  }
  return args;
}

const args = parseArgs(process.argv.slice(2));
const protoRoot = path.resolve(__dirname, "..", "..", "protos");
const definition = protoLoader.loadSync("cbir/v1/search.proto", {
  includeDirs: [protoRoot],
  keepCase: true, // field names as in the .proto (item_id, request_id)
  longs: Number, // int64 model_version as a JS number
  enums: String,
  defaults: true,
  oneofs: true,
});
const cbir = grpc.loadPackageDefinition(definition).cbir.v1;
const client = new cbir.SearchService(args.target, grpc.credentials.createInsecure());

const request = { k: args.k };
if (args.image) request.image = args.image;
else request.item_id = args.itemId;
if (args.labels.length) request.filter = { labels: args.labels };

const metadata = new grpc.Metadata();
if (args.apiKey) metadata.set("authorization", `Bearer ${args.apiKey}`);
const deadline = new Date(Date.now() + args.timeout * 1000);

client.Search(request, metadata, { deadline }, (err, response) => {
  if (err) {
    process.stderr.write(`${grpc.status[err.code]}: ${err.details}\n`);
    process.exit(1);
  }
  process.stdout.write(JSON.stringify(response) + "\n");
  client.close();
});
