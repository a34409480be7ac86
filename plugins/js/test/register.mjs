// `node --import ./test/register.mjs ...`: plugins import 'owlery:plugin/host@0.2.1' from the fake.
import { register } from 'node:module';

register('./hooks.mjs', import.meta.url);
